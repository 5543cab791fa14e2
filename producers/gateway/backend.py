"""What the gateway's handlers talk to: Kafka (produce with the broker's acknowledgement awaited on the
event loop; the status topic followed for live state; one partition's status and completion records
read for an event stream) and Cassandra (api keys, the gateway's own request rows, terminal rows and the
tenant's history). Consumes: ``status`` and ``completions`` (manual assignment, no group, nothing
committed). Produces: ``requests.<priority>`` and ``cancellations``, keyed as the SDK keys them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from cassandra.query import BatchStatement, BatchType
from confluent_kafka import KafkaError, TopicPartition

from plumbing.blobs import BlobStore
from plumbing.clock import now_ms
from plumbing.errors import DecodeError, DeliveryError
from plumbing.headers import new_traceparent, pipeline_headers
from plumbing.kafka_clients import make_consumer, make_producer, start_positions
from plumbing.metadata import connect, register_types
from plumbing.settings import Settings
from plumbing.topics import Topics
from producers.gateway.keys import KeyStore
from producers.gateway.requests import Position, frames_of, partition_of
from schemas.codec import Codec, default_codec
from schemas.records import Completion, GenerationRequest, StatusEvent

log = logging.getLogger(__name__)
T = TypeVar("T")
TRACKED = 100_000  # requests whose live state the gateway remembers
SSE_CONSUMER = {"fetch.wait.max.ms": 20}  # an idle stream's fetch returns this often at least
OWNERSHIP_BATCH = 200  # ownership rows in one UNLOGGED BATCH at most
DRAIN_S = 2.0  # after a completion, how long its stream waits at most for its unread status events
PRODUCE_TIMEOUT_MS = 30_000  # a submission's produce fails (503) when not acknowledged within this
LOOKBACK_MS = (
    15 * 60 * 1000
)  # how far back the status follower starts, so a restarted gateway knows recent state


def _settle_acks(acks: list[tuple[asyncio.Future[None], KafkaError | None, str]]) -> None:
    """Resolve the produce futures of a batch of delivery reports (on their loop)."""
    for future, err, request_id in acks:
        _settle(future, None, None if err is None else DeliveryError(f"{request_id}: {err.str()}"))


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Resolve ``future`` on its loop (from a librdkafka or Cassandra driver thread's callback)."""
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


@dataclass
class Live:
    """A request's state as the status topic tells it."""

    state: str
    stage: str
    at_ms: int
    tenant_id: str
    done_by_task: dict[str, int] = field(default_factory=dict)
    request_total: int = 0

    @property
    def done(self) -> int:
        """Frame-steps done so far, summed over the request's render tasks."""
        return sum(self.done_by_task.values())


def apply_status(live: Live | None, event: StatusEvent, at_ms: int) -> Live:
    """``live`` after one StatusEvent (a new Live for a request's first event)."""
    if live is None:
        live = Live(event.state, event.stage, at_ms, event.tenant_id)
    live.state, live.stage, live.at_ms = event.state, event.stage, at_ms
    progress = event.progress
    if event.state == "RUNNING" and progress and event.task_id:
        live.done_by_task[event.task_id] = int(progress.done)
        live.request_total = int(progress.request_total or live.request_total)
    return live


@dataclass(frozen=True)
class StreamEvent:
    """One event of a request's stream (`Backend.events`): a status event with the request's progress
    summed up to it, or the completion, with the stream's position after it (its SSE id)."""

    position: Position
    record: StatusEvent | Completion
    #: Frame-steps done over all render tasks (status events).
    done: int = 0
    #: Frame-steps of the whole request, once a renderer said (status events).
    request_total: int = 0


def _record_of(codec: Codec, msg: Any, request_id: str) -> StatusEvent | Completion | None:
    """The status event or completion of ``request_id`` a polled message holds; None for anything else
    (no message, an error, another request's record, undecodable bytes)."""
    if msg is None or msg.error():
        return None
    try:
        record = codec.read_any(msg.value())
    except DecodeError:
        return None
    if not isinstance(record, StatusEvent | Completion) or record.request_id != request_id:
        return None
    return record


class Backend:
    """The gateway's Kafka and Cassandra side, one per process: created at start-up (it starts the
    producer's poll thread and the status follower), closed at shutdown."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings)
        self.codec = default_codec()
        self.schema_fields = {f["name"] for f in self.codec.schema("GenerationRequest").parsed["fields"]}
        self.blobs = BlobStore(settings.s3)
        ks = settings.cassandra.keyspace
        self.cluster, self.session = connect(settings.cassandra)
        register_types(self.cluster, ks)
        self.keys = KeyStore(self.session, ks, settings.gateway.key_cache_s)
        self._insert_request = self.session.prepare(
            f"INSERT INTO {ks}.gateway_requests (request_id, tenant_id, kind, prompt, width, height, steps, "
            "frames, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        self._gateway_row = self.session.prepare(f"SELECT * FROM {ks}.gateway_requests WHERE request_id = ?")
        self._terminal_row = self.session.prepare(f"SELECT * FROM {ks}.requests WHERE request_id = ?")
        self._history = self.session.prepare(
            f"SELECT request_id, created_at, kind, model, status, finished_at FROM {ks}.requests_by_tenant "
            "WHERE tenant_id = ? AND month = ? AND created_at <= ? LIMIT ?"
        )
        # Two producers: a submission that finds none in flight goes out at once (linger 0: a lone
        # submission waits for nothing), one that finds others in flight joins the batching producer
        # (linger gateway.linger_ms), so under load one produce request (one acknowledgement, one wake-up
        # of the loop) carries many submissions: a third less CPU per submission than linger 0 for all.
        # A message not acknowledged within PRODUCE_TIMEOUT_MS fails its delivery report, so a
        # submission's wait is bounded without a timer of its own.
        self.producer = make_producer(
            settings, "gateway", **{"linger.ms": 0, "message.timeout.ms": PRODUCE_TIMEOUT_MS}
        )
        linger = settings.gateway.linger_ms
        self._batching = (
            make_producer(
                settings, "gateway.batch", **{"linger.ms": linger, "message.timeout.ms": PRODUCE_TIMEOUT_MS}
            )
            if linger > 0
            else self.producer
        )
        self._producers = list({id(p): p for p in (self.producer, self._batching)}.values())
        self._in_flight = 0  # produces awaiting their acknowledgement (counted on the event loop)
        self._acks: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None], Any, str]] = deque()
        self.partitions = 0
        self.live: OrderedDict[str, Live] = OrderedDict()
        self._live_lock = threading.Lock()
        self._stop = threading.Event()
        self.following = threading.Event()
        self._ownership: list[tuple[tuple[Any, ...], asyncio.Future[None]]] = []
        self._writing = False
        self._writer: asyncio.Task[None] | None = None
        self._unwritten: dict[str, asyncio.Future[None]] = {}
        self.streams = threading.BoundedSemaphore(settings.gateway.max_streams)
        self._stream_threads = ThreadPoolExecutor(
            settings.gateway.max_streams, thread_name_prefix="gateway-sse"
        )
        self._threads = [
            *(
                threading.Thread(
                    target=self._poll_producer, args=(p,), name=f"gateway-producer-{i}", daemon=True
                )
                for i, p in enumerate(self._producers)
            ),
            threading.Thread(target=self._follow_status, name="gateway-status", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop the threads, flush the producers (10 s at most) and close the Cassandra cluster."""
        self._stop.set()
        for producer in self._producers:
            producer.flush(10)
        self._hand_acks()
        for thread in self._threads:
            thread.join(5)
        self._stream_threads.shutdown(wait=False, cancel_futures=True)
        self.cluster.shutdown()

    # -- Kafka --------------------------------------------------------------------------------------------
    def _poll_producer(self, producer: Any) -> None:
        while not self._stop.is_set():
            producer.poll(0.05)
            self._hand_acks()

    def _hand_acks(self) -> None:
        """Settle the futures of the acknowledgements one poll served: one wake-up of each waiting loop
        for them all (a busy gateway's acks come a produce request's batch at a time), not one each."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[None], Any, str]]] = {}
        while True:  # each producer's poll thread drains the one deque: popleft is atomic, a check first not
            try:
                loop, future, err, request_id = self._acks.popleft()
            except IndexError:
                break
            by_loop.setdefault(loop, []).append((future, err, request_id))
        for loop, settled in by_loop.items():
            with contextlib.suppress(RuntimeError):  # its loop closed: no one waits any more
                loop.call_soon_threadsafe(_settle_acks, settled)

    async def produce(self, topic: str, value: bytes, key: str, request_id: str, tenant_id: str) -> None:
        """Produce and return once the broker has acknowledged (raises DeliveryError otherwise, at the
        latest after the producer's ``message.timeout.ms``)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        ack = self._acks.append

        def delivered(err: KafkaError | None, _msg: Any) -> None:  # on the thread that polls
            ack((loop, done, err, request_id))

        headers = pipeline_headers(request_id, tenant_id, new_traceparent())
        producer = self._batching if self._in_flight else self.producer
        self._in_flight += 1
        try:
            while True:
                try:
                    producer.produce(topic, value, key=key, headers=headers, on_delivery=delivered)
                    break
                except BufferError:  # librdkafka's queue is full: give it a moment to drain
                    await asyncio.sleep(0.005)
            await done
        finally:
            self._in_flight -= 1

    def _follow_status(self) -> None:
        """Keep the latest state of recent requests from the status topic (from LOOKBACK_MS back)."""
        consumer = make_consumer(
            self.settings, f"gateway-follow-{uuid.uuid4().hex}", "gateway.follow", **{"fetch.wait.max.ms": 50}
        )
        try:
            metadata = consumer.list_topics(self.topics.status, timeout=10)
            parts = sorted(metadata.topics[self.topics.status].partitions)
            self.partitions = len(parts)
            since = [TopicPartition(self.topics.status, p, now_ms() - LOOKBACK_MS) for p in parts]
            consumer.assign(start_positions(consumer, since))
            self.following.set()
            while not self._stop.is_set():
                msg = consumer.poll(0.2)
                if msg is None or msg.error():
                    continue
                try:
                    event = self.codec.read(msg.value(), StatusEvent)
                except DecodeError:
                    continue
                with self._live_lock:
                    rid = event.request_id
                    self.live[rid] = apply_status(self.live.pop(rid, None), event, msg.timestamp()[1])
                    while len(self.live) > TRACKED:
                        self.live.popitem(last=False)
        except Exception:
            log.exception("the status follower stopped")
            self.following.clear()
            raise
        finally:
            consumer.close()

    def live_state(self, request_id: str) -> Live | None:
        """The request's state as the status follower last saw it; None for one it has not seen."""
        with self._live_lock:
            return self.live.get(request_id)

    async def events(
        self, request_id: str, created_at_ms: int, resume: Position | None, keepalive_s: float
    ) -> AsyncIterator[StreamEvent | None]:
        """The request's status events then its completion, read from the partition its records live on
        (the same index on both topics: both are keyed by request id and have as many partitions) from just
        before it was created. A status event's position is ``<its offset + 1>.0``; the completion's
        ``<last status offset + 1>.<its offset + 1>``, and it is always the last. With ``resume``, only the
        events after that position are yielded (the earlier ones are still read, to sum the progress), so
        a reconnect neither misses nor repeats one. None once the partitions are assigned, then now and
        then while nothing comes (the caller sends a comment)."""
        consumer = make_consumer(
            self.settings, f"gateway-sse-{uuid.uuid4().hex}", "gateway.sse", **SSE_CONSUMER
        )
        try:
            status_tp = await self._assign_stream(consumer, request_id, created_at_ms)
            yield None  # assigned: what is appended from now on is read as it comes
            async for event in self._stream(consumer, status_tp, request_id, resume, keepalive_s):
                yield event
        finally:
            await self._in_stream_thread(consumer.close)

    async def _assign_stream(self, consumer: Any, request_id: str, created_at_ms: int) -> TopicPartition:
        """Assign ``consumer`` the request's partition of both topics from just before it was created;
        returns its status partition."""
        p = partition_of(request_id, self.partitions or self._count_partitions(consumer))
        since = [
            TopicPartition(t, p, created_at_ms - 5000) for t in (self.topics.status, self.topics.completions)
        ]
        consumer.assign(await self._in_stream_thread(start_positions, consumer, since))
        return TopicPartition(self.topics.status, p)

    async def _stream(
        self,
        consumer: Any,
        status_tp: TopicPartition,
        request_id: str,
        resume: Position | None,
        keepalive_s: float,
    ) -> AsyncIterator[StreamEvent | None]:
        position = Position(0, 0)
        live: Live | None = None
        held: tuple[Position, Completion] | None = None  # the completion, once read
        drain: tuple[int, float] | None = None  # (status end offset, give-up time) after it
        idle_since = time.monotonic()
        while True:
            if held is not None and drain is not None and await self._drained(consumer, status_tp, drain):
                final = Position(position.status, held[0].completion)
                if resume is None or final.completion > resume.completion:
                    yield StreamEvent(final, held[1])
                return
            msg = await self._in_stream_thread(consumer.poll, 0.1 if held else 0.25)
            record = _record_of(self.codec, msg, request_id)
            if record is None:
                if (msg is None or msg.error()) and time.monotonic() - idle_since > keepalive_s:
                    idle_since = time.monotonic()
                    yield None
                continue
            offset = int(msg.offset() or 0)
            if isinstance(record, Completion):
                # Its status events may still be unread on the other topic: read that partition up to
                # its present end first, so the completion is always the stream's last event.
                held = (Position(position.status, offset + 1), record)
                _, end = await self._in_stream_thread(consumer.get_watermark_offsets, status_tp, 5.0, False)
                drain = (end, time.monotonic() + DRAIN_S)
                continue
            position = Position(offset + 1, 0)
            live = apply_status(live, record, msg.timestamp()[1])
            if resume is None or offset >= resume.status:
                idle_since = time.monotonic()
                yield StreamEvent(position, record, live.done, live.request_total)

    async def _drained(self, consumer: Any, status_tp: TopicPartition, drain: tuple[int, float]) -> bool:
        """Whether the status partition is read up to ``drain``'s end offset, or its give-up time passed."""
        (at,) = await self._in_stream_thread(consumer.position, [status_tp])
        return bool(at.offset >= drain[0] or time.monotonic() > drain[1])

    async def _in_stream_thread(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` on the streams' own threads (one per open stream at most), so blocking polls
        never wait behind one another or behind the loop's default executor."""
        return await asyncio.get_running_loop().run_in_executor(self._stream_threads, call, *args)

    def _count_partitions(self, consumer: Any) -> int:
        return len(consumer.list_topics(self.topics.status, timeout=10).topics[self.topics.status].partitions)

    # -- Cassandra ----------------------------------------------------------------------------------------
    async def cql(self, statement: Any, params: tuple[Any, ...] | None) -> list[Any]:
        """The rows of one statement (its first page: every query here is bounded by a key or a LIMIT)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        future = self.session.execute_async(statement, params)
        future.add_callbacks(
            lambda rows: loop.call_soon_threadsafe(_settle, done, rows, None),
            lambda exc: loop.call_soon_threadsafe(_settle, done, None, exc),
        )
        return await done

    def record_submission(self, record: GenerationRequest) -> None:
        """Start writing the request's ownership row (`written` waits for it).

        Group commit: while one write is in flight, the rows of the submissions that arrive meanwhile
        gather and go as the next UNLOGGED BATCH (at most `OWNERSHIP_BATCH`), so an idle gateway writes
        each row at once and a busy one pays the driver's per-statement cost once per batch. The 202 does
        not wait for it (waiting cost a busy gateway two thirds of its throughput): a lookup of a request
        whose row is still on its way waits for it instead (`written`)."""
        created = datetime.fromtimestamp(record.created_at / 1000, UTC)
        row = (
            record.request_id,
            record.tenant_id,
            record.kind,
            record.prompt,
            record.width,
            record.height,
            record.steps,
            frames_of(record),
            created,
        )
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._ownership.append((row, done))
        self._unwritten[record.request_id] = done
        if not self._writing:
            self._writing = True
            self._writer = loop.create_task(self._write_ownership())

    async def written(self, request_id: str) -> None:
        """Return once the ownership row of a request this process accepted is in Cassandra."""
        pending = self._unwritten.get(request_id)
        if pending is not None:
            await asyncio.shield(pending)

    async def _write_ownership(self) -> None:
        try:
            while self._ownership:
                rows, self._ownership = self._ownership[:OWNERSHIP_BATCH], self._ownership[OWNERSHIP_BATCH:]
                if len(rows) == 1:
                    statement: Any = self._insert_request.bind(rows[0][0])
                else:
                    statement = BatchStatement(batch_type=BatchType.UNLOGGED)
                    for row, _ in rows:
                        statement.add(self._insert_request, row)
                try:
                    await self.cql(statement, None)
                except Exception as exc:  # noqa: BLE001 - said once per batch; lookups then go by the terminal row
                    log.error("gateway: %d ownership row(s) not written: %s", len(rows), exc)
                    error: BaseException | None = exc
                else:
                    error = None
                for row, done in rows:
                    self._unwritten.pop(row[0], None)
                    _settle(done, None, error)
                    if error is not None:
                        done.exception()  # retrieved here: a lookup may never ask for it
        finally:
            self._writing = False

    async def gateway_row(self, request_id: str) -> Any | None:
        """The gateway's own row of the request (who owns it, what it asked for); None if there is none."""
        rows = await self.cql(self._gateway_row, (request_id,))
        return rows[0] if rows else None

    async def terminal_row(self, request_id: str) -> Any | None:
        """The request's terminal row (the assembler's, in ``requests``); None while it is not finished."""
        rows = await self.cql(self._terminal_row, (request_id,))
        return rows[0] if rows else None

    async def history(self, tenant_id: str, month: str, before: datetime, limit: int) -> list[Any]:
        """Up to ``limit`` of the tenant's finished requests of ``month`` created at ``before`` or earlier,
        newest first."""
        return list(await self.cql(self._history, (tenant_id, month, before, limit)))

    def presigned_outputs(self, row: Any) -> list[dict[str, Any]]:
        """The outputs of a terminal row as the API shows them, each with a freshly presigned URL."""
        outputs = []
        for out in row.outputs or []:
            url, _ = self.blobs.presign(out.bucket, out.key)
            outputs.append(
                {
                    "kind": out.kind,
                    "content_type": out.content_type,
                    "bytes": out.bytes,
                    "width": out.width,
                    "height": out.height,
                    "frames": out.frames,
                    "fps": out.fps,
                    "duration_ms": out.duration_ms,
                    "url": url,
                    "uri": f"s3://{out.bucket}/{out.key}",
                }
            )
        return outputs
