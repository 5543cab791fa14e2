"""The SDK other services use: submit generation requests, follow them, wait for results, cancel.

`Client.submit` validates a request before it leaves the process (the error names the field at fault),
keys it by tenant, picks the request topic by priority and returns once the broker has acknowledged it.
`Client.subscribe` tails the completions and status topics, filtered by request ids or tenant;
`Client.wait` returns a request's Completion. The Client reads no offsets of its own: it consumes with
manual partition assignment, so any number of clients can follow the same topics.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaError, KafkaException, TopicPartition

from plumbing.errors import DecodeError, DeliveryError
from plumbing.headers import new_traceparent, pipeline_headers
from plumbing.kafka_clients import make_consumer, make_producer, produce_sync
from plumbing.settings import Settings
from plumbing.topics import Topics
from schemas.codec import Codec, default_codec
from plumbing.validation import validate_request

POLL_S = 0.2
T = TypeVar("T")
# Errors one-shot requests (offsets_for_times, watermarks) report while a leader is being elected or
# moved; librdkafka does not flag them retriable there.
_TRANSIENT = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._TRANSPORT,
        KafkaError._TIMED_OUT,
        KafkaError.REQUEST_TIMED_OUT,
    }
)
DEFAULT_WAIT_LOOKBACK_MS = 3600 * 1000
_OPTIONAL_FIELDS = (
    "negative_prompt",
    "seed",
    "video",
    "output_format",
    "scheduler",
    "reply_topic",
    "deadline_ms",
    "webhook_url",
)


def retry_transient(call: Callable[[], T], timeout_s: float = 15.0) -> T:
    """``call()``, again while it fails with a retriable Kafka error (a new topic's leader not yet
    known to the broker, a leader moving): librdkafka retries these for produce and fetch itself, but
    not for one-shot requests such as offsets_for_times."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except KafkaException as exc:
            error = exc.args[0]
            if not (error.retriable() or error.code() in _TRANSIENT) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_request(**fields: Any) -> dict[str, Any]:
    """A GenerationRequest record with defaults filled in: a fresh request_id, created_at now,
    NORMAL priority, one image, PNG or MP4 by kind. Unknown keyword arguments are rejected by the codec."""
    request: dict[str, Any] = {
        "request_id": uuid.uuid4().hex,
        "priority": "NORMAL",
        "kind": "VIDEO" if fields.get("video") else "IMAGE",
        "num_images": 1,
        "labels": {},
        "created_at": now_ms(),
        **{name: None for name in _OPTIONAL_FIELDS},
    }
    request.update(fields)
    video = request.get("video")
    if isinstance(video, Mapping):
        request["video"] = {"prompt_end": None, "seed_end": None, **video}
    return request


@dataclass(frozen=True)
class Event:
    """A record seen by `Client.subscribe`: ``kind`` is "completion" or "status"."""

    kind: str
    record: dict[str, Any]
    topic: str
    timestamp_ms: int

    @property
    def request_id(self) -> str:
        return str(self.record["request_id"])


class Client:
    def __init__(
        self,
        settings: Settings,
        *,
        codec: Codec | None = None,
        known_models: Collection[str] | None = (),
    ) -> None:
        """``known_models``: model names to check client-side; () means the settings' registry, None skips."""
        self.settings = settings
        self.topics = Topics(settings)
        self.codec = codec or default_codec()
        self._models = settings.models.keys() if known_models == () else known_models
        self._producer = make_producer(settings, "sdk")
        self._submitted: dict[str, int] = {}
        self._errors: list[DeliveryError] = []

    def _prepare(
        self, request: Mapping[str, Any] | None, fields: dict[str, Any]
    ) -> tuple[dict[str, Any], bytes]:
        record = new_request(**{**(request or {}), **fields})
        validate_request(record, self.settings.limits, self._models, self.topics.reply_prefix, now_ms())
        return record, self.codec.encode("GenerationRequest", record)

    def submit(
        self, request: Mapping[str, Any] | None = None, /, timeout_s: float = 30.0, **fields: Any
    ) -> str:
        """Validate, produce and wait for the broker's acknowledgement; returns the request_id.

        Any GenerationRequest field may be given, e.g. ``webhook_url="https://hooks.example.com/aigc"``
        to have the Completion POSTed there, signed with the tenant's webhook secret (README, Webhooks).
        Raises ValidationError (naming the field) before anything is sent, DeliveryError if the broker
        does not acknowledge in time.
        """
        record, value = self._prepare(request, fields)
        produce_sync(
            self._producer,
            self.topics.requests(record["priority"]),
            value,
            key=record["tenant_id"],
            headers=pipeline_headers(record["request_id"], record["tenant_id"], new_traceparent()),
            timeout_s=timeout_s,
        )
        self._submitted[record["request_id"]] = record["created_at"]
        return str(record["request_id"])

    def submit_nowait(self, request: Mapping[str, Any] | None = None, /, **fields: Any) -> str:
        """Validate and enqueue without waiting; `flush` waits for every acknowledgement (high rates)."""
        record, value = self._prepare(request, fields)

        def delivered(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                self._errors.append(DeliveryError(f"{record['request_id']}: {err.str()}"))

        while True:
            try:
                self._producer.produce(
                    self.topics.requests(record["priority"]),
                    value,
                    key=record["tenant_id"],
                    headers=pipeline_headers(record["request_id"], record["tenant_id"], new_traceparent()),
                    on_delivery=delivered,
                )
                break
            except BufferError:  # the local queue is full: let librdkafka drain it
                self._producer.poll(0.05)
        self._producer.poll(0)
        self._submitted[record["request_id"]] = record["created_at"]
        return str(record["request_id"])

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for every `submit_nowait` acknowledgement; raise the first delivery error, if any."""
        if self._producer.flush(timeout_s):
            raise DeliveryError(f"messages still unacknowledged after {timeout_s} s")
        if self._errors:
            errors, self._errors = self._errors, []
            raise errors[0]

    def cancel(self, request_id: str, tenant_id: str, reason: str | None = None) -> None:
        """Ask every stage to stop work on ``request_id``; the request ends CANCELLED unless already done."""
        record = {
            "request_id": request_id,
            "tenant_id": tenant_id,
            "reason": reason,
            "requested_at": now_ms(),
        }
        produce_sync(
            self._producer,
            self.topics.cancellations,
            self.codec.encode("CancelRequest", record),
            key=request_id,
            headers=pipeline_headers(request_id, tenant_id, new_traceparent()),
        )

    def subscribe(
        self,
        *,
        request_ids: Collection[str] | None = None,
        tenant_id: str | None = None,
        completions: bool = True,
        status: bool = True,
        since_ms: int | None = None,
        from_beginning: bool = False,
        timeout_s: float | None = None,
        extra_topics: Collection[str] = (),
    ) -> Iterator[Event]:
        """Yield completions and status events as they arrive, oldest first.

        Starts at the end of the topics, at ``since_ms`` (a timestamp) or at the beginning; stops after
        ``timeout_s`` without a matching event (never, when None). Undecodable records are skipped.
        """
        topics = [t for t, on in ((self.topics.completions, completions), (self.topics.status, status)) if on]
        topics += list(extra_topics)
        wanted = set(request_ids) if request_ids is not None else None
        consumer = make_consumer(self.settings, f"sdk-{uuid.uuid4().hex}", "sdk.subscribe")
        try:
            consumer.assign(self._start_positions(consumer, topics, since_ms, from_beginning))
            idle_since = time.monotonic()
            while timeout_s is None or time.monotonic() - idle_since < timeout_s:
                msg = consumer.poll(POLL_S)
                if msg is None or msg.error():
                    continue
                try:
                    name, record = self.codec.decode_any(msg.value())
                except DecodeError:  # another producer's garbage is not this subscriber's problem
                    continue
                if wanted is not None and record.get("request_id") not in wanted:
                    continue
                if tenant_id is not None and record.get("tenant_id") != tenant_id:
                    continue
                idle_since = time.monotonic()
                kind = "completion" if name == "Completion" else "status"
                yield Event(kind, record, str(msg.topic()), msg.timestamp()[1])
        finally:
            consumer.close()

    def _start_positions(
        self, consumer: Any, topics: list[str], since_ms: int | None, from_beginning: bool
    ) -> list[TopicPartition]:
        metadata = consumer.list_topics(timeout=10)
        partitions = [
            TopicPartition(topic, p, since_ms if since_ms is not None else OFFSET_END)
            for topic in topics
            for p in sorted(metadata.topics[topic].partitions)
        ]
        if from_beginning:
            return [TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING) for tp in partitions]
        if since_ms is None:
            return partitions
        resolved = retry_transient(lambda: consumer.offsets_for_times(partitions, timeout=10))
        return [
            tp if tp.offset >= 0 else TopicPartition(tp.topic, tp.partition, OFFSET_END) for tp in resolved
        ]

    def wait(self, request_id: str, timeout_s: float = 300.0, since_ms: int | None = None) -> dict[str, Any]:
        """The Completion of ``request_id``; raises TimeoutError if none arrives within ``timeout_s``.

        Looks back to the request's submission time (or ``since_ms``, or an hour) so a result that came
        before the call is still found.
        """
        start = since_ms or self._submitted.get(request_id) or now_ms() - DEFAULT_WAIT_LOOKBACK_MS
        deadline = time.monotonic() + timeout_s
        for event in self.subscribe(
            request_ids=[request_id], status=False, since_ms=start - 1000, timeout_s=timeout_s
        ):
            if event.kind == "completion":
                return event.record
            if time.monotonic() > deadline:
                break
        raise TimeoutError(f"no completion for {request_id} within {timeout_s} s")

    def close(self) -> None:
        self._producer.flush(10)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
