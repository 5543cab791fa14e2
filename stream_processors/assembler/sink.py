"""The assembler sink: FramesRendered and early decisions in; stored results, Cassandra rows, Completions out.

Consumes ``aigc.frames.<class>`` (what renderers did with each task) and ``aigc.decisions.<class>``
(Completion records the gatekeeper decided before any rendering) with ``read_committed``, most urgent
class first (`inbox.Inbox`: a flood of LOW rejections never delays a HIGH request's terminal work by
more than one bounded batch). Produces ``aigc.completions`` (and the request's reply topic), ASSEMBLING
status events and dead letters.

Delivery: each batch of consumed messages is handled inside one Kafka transaction that also commits
the batch's consumer offsets, so outputs and progress are committed together or not at all; a crash
repeats the batch, never loses it.

Exactly one Completion per request_id, even when the sink dies between writing and emitting:
1. the terminal row is written once (Cassandra ``INSERT ... IF NOT EXISTS``) and records ``decided_by``,
   the topic:partition:offset of the input that decided it;
2. that input publishes the Completion in the transaction that commits its own offset;
3. if the sink dies before that transaction commits, the broker aborts it (read_committed consumers
   never see its Completion) and the input is consumed again: the insert now fails, but ``decided_by``
   names this very input, so the Completion is published again from the stored row;
4. every other input for a finished request (a re-rendered frame, a late rejection) finds a row decided
   by another input and publishes nothing.

Output moderation (`settings.output_check`, on by default): every task's frames are checked before any
result object is written, by the renderer that made them (its verdict in FramesRendered
``output_check``) or, for frames that arrive unchecked, by the sink itself. A block decides the request
at once: the staged frames so far are copied to the quarantine bucket and a REJECTED / OUTPUT_MODERATED
terminal row (verdict, scores and quarantine location in its ``moderation`` map) is written through the
same write-once path, so its Completion has the verdict and no outputs; the other tasks' frames, when
they come, are surplus. The check is deterministic on the same pixels, so a repeated batch decides the
same way, and once the row exists it is the stored row that is published.
The transactional.id is stable per sink instance, so a restarted sink fences its predecessor and
aborts its open transaction at once instead of after the transaction timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from cassandra.cluster import Cluster, ResponseFuture, Session
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from plumbing import tracing
from plumbing.backoff import Backoff
from plumbing.blobs import BlobStore
from plumbing.call_counts import CallCounts
from plumbing.cancellations import CancellationWatcher
from plumbing.clock import now_ms
from plumbing.dead_letters import Original
from plumbing.errors import DecodeError, classify
from plumbing.headers import REPLY_TOPIC, Outgoing, continue_headers
from plumbing.kafka_clients import consume_available, header_map, make_consumer, make_producer
from plumbing.log_format import bind_message
from plumbing.metadata import OutputRow, connect, connect_when_up, register_types
from plumbing.observability import Readiness, serve
from plumbing.output_check import REASON_CODE, NudeNetDetector, OutputCheck, OutputVerdict
from plumbing.output_check import from_record as output_check_from_record
from plumbing.retries import route_failure
from plumbing.settings import Settings
from plumbing.shutdown import stop_on_signals
from plumbing.topics import PRIORITIES, Stage, Topics
from plumbing.validation import ID_PATTERN
from plumbing.watchdog import Watchdog
from schemas.codec import default_codec
from schemas.records import Completion, FramesRendered, ModerationVerdict, Progress, Record, StatusEvent
from stream_processors.assembler.assembly import Assembler, completion_from_row
from stream_processors.assembler.inbox import Inbox
from stream_processors.assembler.metrics import READINESS, SinkMetrics, observe
from stream_processors.assembler.store import (
    AssemblyStore,
    FrameRow,
    TerminalRow,
    moderation_row,
    ts,
)

log = logging.getLogger(__name__)
TOPIC_REFRESH_S = 30.0
# The pause before fetching a failed batch again: 0.4 s after the first failure in a row, doubling to 10 s.
BATCH_BACKOFF = Backoff(first_s=0.4, max_s=10.0)
# Timeout of each transactional call; one that times out (retriable) is made again, so this bounds only how
# long a call waits before it is asked again, not how long the sink retries.
TXN_CALL_S = 10.0
# How long past its timeout a call may block before the process ends (see `_call`).
TXN_CALL_MARGIN_S = 10.0
# How long send_offsets_to_transaction may block before the sink gives up on its producer (see
# `_send_offsets`): it took up to 6.5 s while a killed group coordinator moved to another broker.
OFFSETS_STUCK_S = 8.0
# While it blocks, how often the sink asks whether a broker has left the cluster (see `_broker_left`).
OFFSETS_CHECK_S = 0.5
# The longest pause between the producer's connection attempts to a broker that is down. librdkafka looks
# for a new group coordinator (send_offsets_to_transaction's TxnOffsetCommit) only when an attempt to reach
# the dead one fails (librdkafka #5511), and its default backoff grows to 10 s: after a coordinator kill the
# attempts came 3 and 6 s in, around the 4 s fencing, then 10 s apart. With 1 s it asks again about every
# second until the dead broker leaves the cluster's metadata (and then see `Sink._send_offsets`).
RECONNECT_BACKOFF_MAX_MS = 1000
R = TypeVar("R", bound=Record)


class Sink:
    """The assembler sink: consumes frames and decisions, publishes each request's one Completion."""

    def __init__(self, settings: Settings, cassandra: tuple[Cluster, Session] | None = None) -> None:
        """``cassandra``: a connection made already (`run` waits for Cassandra); else one is made here."""
        conf = settings.assembler
        self.settings = settings
        self.topics = Topics(settings)
        self.codec = default_codec()
        self.consumer = make_consumer(
            settings,
            f"{settings.kafka.topic_prefix}.assembler",
            "assembler",
            **{"max.poll.interval.ms": 600_000},
        )
        self.producer = self._transactional_producer()
        self._stuck: list[Producer] = []  # producers left blocked in librdkafka (see `_send_offsets`)
        counts = CallCounts.when_on(settings.call_counts_dir)
        self.cluster, session = cassandra or connect(settings.cassandra)
        if counts is not None:
            counts.count_cql(session)
        register_types(self.cluster, settings.cassandra.keyspace)
        self.store = AssemblyStore(session, settings.cassandra.keyspace)
        self.blobs = BlobStore(settings.s3, max_connections=conf.workers * 2, counts=counts)
        self.pool = ThreadPoolExecutor(
            conf.workers, thread_name_prefix="assemble"
        )  # object copies, downloads
        self.workers = ThreadPoolExecutor(
            conf.concurrency, thread_name_prefix="request"
        )  # requests of a batch
        self.assembler = Assembler(self.blobs, settings.s3.results_bucket, conf.quarantine_bucket, self.pool)
        self._checker: OutputCheck | None = None  # built when frames first arrive unchecked
        self.cancellations = CancellationWatcher(settings)
        self.inbox: Inbox[Message] = Inbox(lambda topic: self.topics.class_of(topic).rank, conf.batch_size)
        self.frames_topics = {self.topics.frames(p) for p in PRIORITIES}
        self.paused: set[tuple[str, int]] = set()
        self._topics_seen: set[str] = set()
        self._topics_checked_at = 0.0
        self._brokers: set[int] = set()  # the cluster's brokers when last looked at (see `_broker_left`)
        self._brokers_checked_at = 0.0
        self.watchdog = Watchdog(conf.stall_timeout_s)
        self.failures = 0  # batches failed in a row (the pause before fetching again grows with it)
        self.readiness, self.metrics = Readiness(), SinkMetrics()  # `run` gives it the process's readiness

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Consume and handle batches until ``stop`` is set; the batch in hand is finished first."""
        conf = self.settings.assembler
        self.cancellations.start()
        self._call(partial(self.producer.init_transactions, TXN_CALL_S), stop)
        inputs = self.topics.sink_inputs()
        self.consumer.subscribe(inputs, on_revoke=self._lose, on_lost=self._lose)
        log.info("assembler consuming %s", ", ".join(inputs))
        self.readiness.mark("kafka")
        try:
            while not stop.is_set():
                self.watchdog.beat()
                if time.monotonic() - self._brokers_checked_at > TOPIC_REFRESH_S:
                    self._broker_left()
                fetched = consume_available(self.consumer, conf.batch_size, 0 if self.inbox else conf.poll_s)
                self.inbox.add(m for m in fetched if self._ok(m))
                self._flow()
                batch = self.inbox.take(self._limit)
                if batch:
                    self._transact(batch, stop)
        finally:
            self.consumer.close()
            self.cancellations.stop()
            self.workers.shutdown(wait=True)
            self.pool.shutdown(wait=True)
            self.cluster.shutdown()
            self.watchdog.stop()

    def _transactional_producer(self) -> Producer:
        """A producer with this sink's transactional.id: its init_transactions fences any earlier one."""
        kafka, conf = self.settings.kafka, self.settings.assembler
        return make_producer(
            self.settings,
            "assembler",
            **{
                "transactional.id": f"{kafka.topic_prefix}.assembler.{conf.instance}",
                "transaction.timeout.ms": conf.transaction_timeout_ms,
                "reconnect.backoff.max.ms": RECONNECT_BACKOFF_MAX_MS,
            },
        )

    def _limit(self, rank: int) -> int:
        """How many messages one batch of a class takes: a class below HIGH takes a smaller batch, since
        whatever arrives for a more urgent class meanwhile waits for that batch's transaction."""
        conf = self.settings.assembler
        return conf.batch_size if rank == 0 else min(conf.batch_size, conf.background_batch_size)

    def _flow(self) -> None:
        """Pause partitions with more waiting in the inbox than a batch; resume them once drained."""
        crowded = self.inbox.crowded() - self.paused
        drained = self.inbox.drained(self.paused)
        if crowded:
            self.consumer.pause([TopicPartition(t, p) for t, p in crowded])
            self.paused |= crowded
        if drained:
            self.consumer.resume([TopicPartition(t, p) for t, p in drained])
            self.paused -= drained

    def _lose(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions revoked or lost in a rebalance: what waits for them is the next owner's. Paused ones
        are resumed as they go: librdkafka keeps a partition paused across its revocation, so one assigned
        back later would otherwise never be fetched again (as the relay's `_on_revoke` does)."""
        keys = {(tp.topic, tp.partition) for tp in partitions}
        self.inbox.drop(keys)
        paused = self.paused & keys
        if paused:
            with contextlib.suppress(KafkaException):  # already gone (lost): nothing left to resume
                consumer.resume([TopicPartition(t, p) for t, p in paused])
        self.paused -= keys

    def _ok(self, msg: Message) -> bool:
        if msg.error():
            log.warning("consumer error: %s", msg.error())
            return False
        return True

    def _transact(self, batch: list[Message], stop: threading.Event) -> None:
        """Handle ``batch`` and commit its outputs and offsets in one transaction.

        librdkafka's rules for a failed transactional call: a retriable error (a timeout: the operation
        goes on in the background) means call it again; any other non-fatal error means abort the
        transaction; a fatal one (fenced) ends the process. After an abort the consumer is rewound to the
        batch and the loop polls again after a growing pause: polling keeps the consumer in its group (a
        sink that retried in place with a membership lost in a broker outage got UNKNOWN_MEMBER_ID for
        ever), and partitions that moved to another sink in the meantime are simply not fetched again."""
        producer = self.producer
        producer.begin_transaction()
        try:
            for out in self.handle(batch):
                if out.partition is None:
                    producer.produce(out.topic, out.value, out.key, headers=out.headers)
                else:
                    producer.produce(
                        out.topic, out.value, out.key, partition=out.partition, headers=out.headers
                    )
            ends = [TopicPartition(t, p, end) for (t, p), (_, end) in _offset_ranges(batch).items()]
            self._send_offsets(ends, stop)
            self._call(partial(producer.commit_transaction, TXN_CALL_S), stop)
            self.metrics.committed()
            self.failures = 0
            return
        except Exception as exc:
            kind = classify(exc)
            if kind is None:
                raise
            if self.producer is producer:  # else the new producer's init_transactions aborted it
                self._call(partial(producer.abort_transaction, TXN_CALL_S), stop)
            self.metrics.aborted()
            self.failures += 1
            delay = BATCH_BACKOFF.delay_s(self.failures)
            log.warning(
                "batch of %d failed (%s, failure %d in a row); fetching it again in %.1f s: %s",
                len(batch),
                kind.value,
                self.failures,
                delay,
                exc,
            )
        self._rewind(batch)
        stop.wait(delay)

    def _rewind(self, batch: list[Message]) -> None:
        """Seek back to the first offset of each partition of ``batch``: none of it was committed.

        A partition this sink no longer owns cannot be sought (its next owner starts from the committed
        offset); one it still owns but cannot seek would go on past the batch, so the process ends and
        the whole assignment restarts from the committed offsets."""
        owned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        ranges = _offset_ranges(batch)
        self.inbox.drop(ranges)  # what waited behind the batch is fetched again after it
        resumed = self.paused & set(ranges)
        if resumed:
            self.consumer.resume([TopicPartition(t, p) for t, p in resumed])
            self.paused -= resumed
        for (topic, partition), (offset, _) in ranges.items():
            try:
                self.consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException:
                if (topic, partition) in owned:
                    raise
                log.info("%s[%d] is no longer this sink's; the next owner fetches it", topic, partition)

    def _send_offsets(self, offsets: list[TopicPartition], stop: threading.Event) -> None:
        """Add the batch's consumer offsets to the open transaction, from a thread of its own.

        librdkafka 2.16 can block in ``send_offsets_to_transaction`` far beyond its timeout when the
        group's coordinator died: it waits for that broker to come back instead of finding the new
        coordinator (librdkafka #5511, #5456), 20 s and more in `aigc chaos` broker kills: once the dead
        broker is fenced it leaves the cluster's metadata, librdkafka ends its broker thread, and the
        call, waiting for that thread to change state, is never woken. Only a new producer recovers. So
        when a broker leaves the cluster while the call blocks, or after `OFFSETS_STUCK_S` at the latest,
        the sink leaves the blocked producer to its thread (kept, never used or destroyed again) and
        starts another with the same transactional.id: its init_transactions fences the old one and aborts
        the open transaction, so nothing of the batch is committed, and the batch is fetched again (a
        retriable error)."""
        producer = self.producer
        call = partial(
            producer.send_offsets_to_transaction, offsets, self.consumer.consumer_group_metadata(), TXN_CALL_S
        )
        try:
            self._call(partial(_within, OFFSETS_STUCK_S, call, self._broker_left), stop)
        except TimeoutError as exc:
            log.warning(
                "send_offsets_to_transaction %s (librdkafka #5511): a new producer fences this one and "
                "the batch is fetched again",
                exc,
            )
            self._stuck.append(producer)
            self.producer = self._transactional_producer()
            self._call(partial(self.producer.init_transactions, TXN_CALL_S), stop)
            self.metrics.producer_replaced()
            raise KafkaException(
                KafkaError(KafkaError._TIMED_OUT, "send_offsets_to_transaction blocked", retriable=True)
            ) from None

    def _call(self, call: Callable[[], None], stop: threading.Event) -> None:
        """A transactional call, made again for as long as librdkafka calls its error retriable.

        Each call gets `TXN_CALL_S` (its own timeout) plus a margin before the process ends: a call that
        overstays it this long will not return (see `_send_offsets`), and a restarted process gets a new
        producer."""
        while True:
            try:
                with self.watchdog.limit(TXN_CALL_S + TXN_CALL_MARGIN_S):
                    return call()
            except KafkaException as exc:
                error = exc.args[0]
                if not error.retriable() or stop.is_set():
                    raise
                log.warning("%s; calling again", error.str())

    # -- one batch --------------------------------------------------------------------------------
    def handle(self, batch: Iterable[Message]) -> list[Outgoing]:
        """The outputs of a batch. The batch's requests are handled concurrently (each request's messages
        in order, by one worker); deferred chores (index rows, staged-frame deletions) are done once for
        the batch, before its transaction commits. A message that fails is routed (retry topic or dead
        letter, inside the same transaction); back-pressure or an unknown error fails the whole batch
        (fetched again after a pause, or the sink crashes), since nothing of it is committed."""
        chores = Chores()
        groups: dict[object, list[Message]] = {}
        for msg in batch:
            groups.setdefault(msg.key() or object(), []).append(msg)
        futures = [self.workers.submit(self._handle_request, msgs, chores) for msgs in groups.values()]
        wait(futures)
        outputs = [out for future in futures for out in future.result()]
        chores.finish(self.blobs, self.settings.s3.staging_bucket)
        return outputs

    @tracing.spanned(
        "assembler.request", lambda _self, messages, _chores: messages[0].headers(), outcome="COLLECTED"
    )
    def _handle_request(self, messages: list[Message], chores: Chores) -> list[Outgoing]:
        outputs: list[Outgoing] = []
        for msg in messages:
            original = Original.of(msg)
            bind_message(original.headers)
            record: Record | None = None
            try:
                record = self.codec.read_any(msg.value())
                outputs += self._handle(record, msg, original, chores)
            except Exception as exc:
                routed = route_failure(
                    self.codec,
                    self.topics,
                    self.settings.retry,
                    Stage.ASSEMBLER,
                    original,
                    exc,
                    now_ms(),
                    getattr(record, "request_id", None),
                    getattr(record, "tenant_id", None),
                )  # raises exc again when it is unknown
                if routed is None:
                    raise  # back-pressure: the batch is fetched again after a pause
                log.warning(
                    "%s %s: %s", "dead-lettered" if routed.dead else "retrying", original.coordinates, exc
                )
                outputs.append(Outgoing(routed.topic, routed.key, routed.value, routed.headers))
        return outputs

    def _handle(self, record: Record, msg: Message, original: Original, chores: Chores) -> list[Outgoing]:
        """The outputs of one decoded input: a FramesRendered on a frames topic, else a Completion decided
        before rendering (its reply topic in a header)."""
        if original.topic in self.frames_topics:
            fr = _expect(record, FramesRendered, original.topic)
            return self._frames(fr, Input(msg, original.origin, chores, fr.reply_topic, fr.webhook_url))
        completion = _expect(record, Completion, original.topic)
        reply = header_map(msg).get(REPLY_TOPIC)
        source = Input(
            msg, original.origin, chores, reply.decode() if reply else None, completion.webhook_url
        )
        return self._decision(completion, source)

    def _decision(self, completion: Completion, source: Input) -> list[Outgoing]:
        """Record a decision made before rendering and publish it, once."""
        row = TerminalRow(
            request_id=completion.request_id,
            tenant_id=completion.tenant_id,
            status=completion.status,
            reason_code=completion.reason_code,
            message=completion.message,
            retry_after_ms=completion.retry_after_ms,
            moderation=moderation_row(completion.moderation),
            outputs=[],
            queued_ms=0,
            render_ms=0,
            assemble_ms=0,
            total_ms=completion.timings.total_ms,
            labels=completion.labels or {},
            created_at=ts(completion.created_at or None),
            finished_at=ts(completion.finished_at),
            decided_by=source.origin,
        )
        return self._finish(row, source)

    def _frames(self, fr: FramesRendered, source: Input) -> list[Outgoing]:
        """Record what a renderer did with one task; once every frame is in (or the request is decided
        otherwise: a task that did not render, an output block, a cancellation), write the terminal row
        and publish the Completion."""
        request_id = fr.request_id
        tracing.annotate(priority=fr.priority, frames_outcome=fr.outcome)
        if fr.outcome != "RENDERED":
            row = self._row(fr, source.origin, fr.outcome, fr.reason_code, fr.message, [], [])
            return self._finish(row, source)
        per_frame_ms = fr.render_ms // max(1, len(fr.blobs))
        arrived = [
            FrameRow(
                b.frame_index,
                fr.task_id,
                b.bucket,
                b.key,
                b.sha256,
                b.bytes,
                per_frame_ms,
                fr.started_at,
                fr.finished_at,
            )
            for b in fr.blobs
        ]
        self.metrics.frames(len(arrived))
        stored = self.store.terminal(request_id)
        if stored is not None:
            return self._finished_already(stored, arrived, source)
        # One message carrying every frame (any one-task request) needs no bookkeeping in the frames table.
        whole = len({f.frame_index for f in arrived}) == fr.frame_count
        blocked = self._output_check(fr, arrived)
        if blocked is not None:  # no need to wait for the other tasks' frames: the request is decided
            so_far = arrived if whole else [*self.store.frames(request_id), *arrived]
            return [self._status(fr, source.msg), *self._blocked(fr, so_far, *blocked, source)]
        if not whole:
            self.store.add_frames(request_id, arrived)
        frames = arrived if whole else self.store.frames(request_id)
        if len({f.frame_index for f in frames}) < fr.frame_count:
            return []
        if self.cancellations.is_cancelled(request_id, fr.tenant_id):
            reason = self.cancellations.reason(request_id) or "cancelled by its owner"
            row = self._row(fr, source.origin, "CANCELLED", "CANCELLED", reason, [], frames)
            return self._finish(row, source, staged=frames)
        out = [self._status(fr, source.msg)]
        outputs = self.assembler.assemble(fr, frames)
        row = self._row(fr, source.origin, "SUCCEEDED", None, None, outputs, frames)
        return out + self._finish(row, source, staged=frames)

    def _finished_already(self, row: TerminalRow, arrived: list[FrameRow], source: Input) -> list[Outgoing]:
        """Frames for a request that is finished already. Its staged frames may be gone (deleted before an
        aborted commit), so nothing is assembled again: if this very input decided it, its transaction
        never committed and it publishes the stored result again; any other input is surplus."""
        source.chores.delete(f.key for f in [*arrived, *self.store.frames(row.request_id)])
        if row.decided_by != source.origin:
            return []
        self._index(row, source.chores)
        return self._publish(row, source)

    def _output_check(
        self, fr: FramesRendered, arrived: list[FrameRow]
    ) -> tuple[OutputVerdict, ModerationVerdict] | None:
        """Whether ``fr``'s frames may be published: the renderer's check when it made one, else (output
        check on) the sink's own on the staged frames; None to publish, else the verdict (its
        ``frame_index`` the frame's index in the request) and its ModerationVerdict record."""
        if fr.output_check is not None:
            return output_check_from_record(fr.output_check)
        conf = self.settings.output_check
        if not conf.enabled:
            return None
        if self._checker is None:
            self._checker = OutputCheck(NudeNetDetector(conf.threads), conf.unsafe_labels)
        ordered = sorted(arrived, key=lambda f: f.frame_index)
        verdict = self._checker.check(self.assembler.pixels(ordered))
        if verdict is None:
            return None
        verdict = dataclasses.replace(verdict, frame_index=ordered[verdict.frame_index].frame_index)
        return verdict, self._checker.moderation(verdict)

    def _blocked(
        self,
        fr: FramesRendered,
        frames: list[FrameRow],
        verdict: OutputVerdict,
        moderation: ModerationVerdict,
        source: Input,
    ) -> list[Outgoing]:
        """Quarantine the frames so far of a request whose output moderation blocked, and end it REJECTED
        with the verdict."""
        where = self.assembler.quarantine(fr, frames)
        message = verdict.message(fr.kind)
        row = self._row(fr, source.origin, "REJECTED", REASON_CODE, message, [], frames)
        row.moderation = moderation_row(
            moderation,
            frame_index=str(verdict.frame_index),
            threshold=repr(verdict.threshold),
            quarantine=where,
        )
        log.warning("%s: %s; frames quarantined in %s", fr.request_id, message, where)
        return self._finish(row, source, staged=frames)

    def _row(
        self,
        fr: FramesRendered,
        origin: str,
        status: str,
        reason: str | None,
        message: str | None,
        outputs: list[OutputRow],
        frames: list[FrameRow],
    ) -> TerminalRow:
        """The terminal row of ``fr``'s request ending with ``status`` now, decided by ``origin``."""
        finished = now_ms()
        started = min((f.started_at for f in frames), default=fr.started_at)
        last_frame = max((f.rendered_at for f in frames), default=finished)
        return TerminalRow(
            request_id=fr.request_id,
            tenant_id=fr.tenant_id,
            kind=fr.kind,
            priority=fr.priority,
            model=fr.model,
            prompt=fr.prompt,
            prompt_end=fr.prompt_end,
            negative_prompt=fr.negative_prompt,
            width=fr.width,
            height=fr.height,
            steps=fr.steps,
            guidance_scale=fr.guidance_scale,
            scheduler=fr.scheduler,
            seed=fr.seed,
            frame_count=fr.frame_count,
            fps=fr.fps,
            output_format=fr.output_format,
            labels=fr.labels,
            status=status,
            reason_code=reason,
            message=message,
            outputs=outputs,
            queued_ms=max(0, started - fr.accepted_at) if frames else 0,
            render_ms=sum(f.render_ms for f in frames),
            assemble_ms=max(0, finished - last_frame) if frames else 0,
            total_ms=max(0, finished - fr.created_at),
            created_at=ts(fr.created_at),
            accepted_at=ts(fr.accepted_at),
            finished_at=ts(finished),
            decided_by=origin,
        )

    def _finish(
        self, row: TerminalRow, source: Input, staged: list[FrameRow] | None = None
    ) -> list[Outgoing]:
        """Write ``row`` once and publish the Completion of the row that holds the request's state, unless
        another input decided it. ``staged``: the request's staged frames, when already read."""
        written = self.store.write_terminal(row)
        # Whoever decided, the request is finished now: its staged frames have served their purpose.
        source.chores.delete(
            f.key for f in (staged if staged is not None else self.store.frames(row.request_id))
        )
        if not written.applied and written.row.decided_by != source.origin:
            log.info(
                "%s is already %s; %s publishes nothing", row.request_id, written.row.status, source.origin
            )
            return []
        # Written now, or by this input before its transaction aborted (then the index row may be missing).
        self._index(row, source.chores)
        return self._publish(written.row, source)

    def _index(self, row: TerminalRow, chores: Chores) -> None:
        """The tenant's history row (an idempotent insert); a rejected request's tenant may be any string,
        and the history lists valid tenants only."""
        if ID_PATTERN.fullmatch(row.tenant_id or ""):
            chores.write(self.store.index_by_tenant_async(row))

    @tracing.step("assembler.publish")
    def _publish(self, row: TerminalRow, source: Input) -> list[Outgoing]:
        """The Completion of a terminal row, for the completions topic and the request's reply topic; it
        carries the request's webhook_url (from the input that decided it) for webhook delivery."""
        tracing.annotate(outcome=row.status)
        completion = completion_from_row(
            row, self.blobs, self.settings.s3.presign_ttl_s, webhook_url=source.webhook_url
        )
        self.metrics.published(row)
        value = self.codec.write(completion)
        headers = continue_headers(header_map(source.msg), row.request_id, row.tenant_id)
        key = row.request_id.encode()
        out = [Outgoing(self.topics.completions, key, value, headers)]
        reply_topic = source.reply_topic
        if reply_topic and self._topic_exists(reply_topic):
            out.append(Outgoing(reply_topic, key, value, headers))
        elif reply_topic:
            log.warning(
                "reply topic %s of %s does not exist; the completion went to %s only",
                reply_topic,
                row.request_id,
                self.topics.completions,
            )
        return out

    def _status(self, fr: FramesRendered, msg: Message) -> Outgoing:
        """The ASSEMBLING status event of ``fr``'s request: all its frames are in."""
        event = StatusEvent(
            request_id=fr.request_id,
            tenant_id=fr.tenant_id,
            stage=Stage.ASSEMBLER.value,
            state="ASSEMBLING",
            progress=Progress(done=fr.frame_count, total=fr.frame_count, request_total=0),
            at=now_ms(),
        )
        return Outgoing(
            self.topics.status,
            fr.request_id.encode(),
            self.codec.write(event),
            continue_headers(header_map(msg), fr.request_id, fr.tenant_id),
        )

    def _broker_left(self) -> bool:
        """Whether a broker seen in the cluster when last looked has left its metadata since (a fenced,
        dead broker leaves it); remembers the brokers there now."""
        self._brokers_checked_at = time.monotonic()
        try:
            brokers = set(self.producer.list_topics(self.topics.completions, timeout=2).brokers)
        except KafkaException:
            return False  # no answer: nothing learnt
        left = self._brokers - brokers
        self._brokers = brokers
        if left:
            log.warning("broker(s) %s left the cluster", ", ".join(map(str, sorted(left))))
        return bool(left)

    def _topic_exists(self, topic: str) -> bool:
        """Whether ``topic`` exists (the broker's topic list, asked again when it is unknown or stale)."""
        if topic not in self._topics_seen or time.monotonic() - self._topics_checked_at > TOPIC_REFRESH_S:
            self._topics_seen = set(self.producer.list_topics(timeout=10).topics)
            self._topics_checked_at = time.monotonic()
        return topic in self._topics_seen


class Chores:
    """Work a batch defers until all its requests are handled, then does at once before the commit:
    writes to wait for (index rows) and staged frames to delete (one S3 call per 1,000 keys)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.keys: list[str] = []
        self.futures: list[ResponseFuture] = []

    def delete(self, keys: Iterable[str]) -> None:
        """Delete the staged objects ``keys`` when the batch finishes."""
        with self.lock:
            self.keys.extend(keys)

    def write(self, future: ResponseFuture) -> None:
        """Wait for the write ``future`` before the batch commits."""
        with self.lock:
            self.futures.append(future)

    def finish(self, blobs: BlobStore, bucket: str) -> None:
        """Wait for every deferred write, then delete the staged objects from ``bucket``."""
        for future in self.futures:
            future.result()
        if self.keys:
            blobs.delete(bucket, self.keys)


@dataclass(frozen=True, slots=True)
class Input:
    """One consumed message in hand: what deciding its request and publishing the Completion need."""

    msg: Message
    origin: str  # topic:partition:offset where it was first consumed: the terminal row's decided_by
    chores: Chores
    reply_topic: str | None  # the request's reply topic, where the Completion also goes
    webhook_url: str | None  # the request's webhook URL, carried in the Completion


def _expect(record: Record, cls: type[R], topic: str) -> R:
    """``record`` as a ``cls`` record; `DecodeError` (WRONG_SCHEMA) when ``topic`` carried another one."""
    if not isinstance(record, cls):
        raise DecodeError(f"expected {cls.SCHEMA} on {topic}, got {record.SCHEMA}", code="WRONG_SCHEMA")
    return record


def _within(seconds: float, call: Callable[[], None], give_up: Callable[[], bool] = lambda: False) -> None:
    """Call ``call`` on a thread of its own and raise what it raised; raise TimeoutError, leaving the thread
    to it, when it has not returned after ``seconds``, or sooner once ``give_up()`` (asked every
    `OFFSETS_CHECK_S` while it waits) says so."""
    outcome: list[Exception | None] = []

    def run() -> None:
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - raised again by the waiting thread
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, name="transaction-call", daemon=True)
    thread.start()
    started = time.monotonic()
    while True:
        waited = time.monotonic() - started
        thread.join(max(0.0, min(OFFSETS_CHECK_S, seconds - waited)))
        if outcome:
            break
        waited = time.monotonic() - started
        if waited >= seconds:
            raise TimeoutError(f"blocked for {seconds:.0f} s")
        if give_up():
            raise TimeoutError(f"blocked for {waited:.1f} s and given up")
    if outcome[0] is not None:
        raise outcome[0]


def _offset_ranges(batch: Iterable[Message]) -> dict[tuple[str, int], tuple[int, int]]:
    """Per partition of ``batch``: its first offset and the offset after its last."""
    ranges: dict[tuple[str, int], tuple[int, int]] = {}
    for msg in batch:
        original = Original.of(msg)
        key = (original.topic, original.partition)
        first, end = ranges.get(key, (original.offset, original.offset + 1))
        ranges[key] = (min(first, original.offset), max(end, original.offset + 1))
    return ranges


def run(settings: Settings) -> None:
    """Run the sink until SIGINT or SIGTERM; the batch in hand is finished first."""
    stop = stop_on_signals()
    obs = serve(settings, Stage.ASSEMBLER.value, *READINESS)
    cassandra = connect_when_up(settings.cassandra, stop)
    if cassandra is None:  # stopped while waiting for Cassandra
        return
    sink = Sink(settings, cassandra)
    sink.readiness = obs.readiness
    observe(obs.readiness, sink)
    sink.run(stop)
