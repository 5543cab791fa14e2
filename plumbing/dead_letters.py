"""Dead-letter envelopes: the original message byte for byte, plus why and when it failed.

The value is a DeadLetter record; the Kafka headers are the original headers followed by ``dlq.*``
headers that repeat the facts (original topic, partition, offset; stage; error kind, code and message;
attempts; first and last failure), in the manner of Kafka Connect's ``__connect.errors.*`` and Spring
Kafka's ``kafka_dlt-*`` headers, so tools that never decode Avro can still filter dead letters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from confluent_kafka import Message

from plumbing import metrics
from plumbing.errors import PipelineError
from plumbing.headers import ORIGIN, Headers
from plumbing.kafka_clients import header_list
from schemas.codec import Codec
from schemas.records import DeadLetter, Header

MAX_ERROR_CHARS = 4000


@dataclass(frozen=True)
class Original:
    """A consumed message as it was: enough to put it back exactly."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)

    @classmethod
    def of(cls, msg: Message) -> Original:
        """A consumed confluent-kafka message (its topic, partition and offset are always set)."""
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        if topic is None or partition is None or offset is None:
            raise ValueError("not a consumed message: it has no topic, partition or offset")
        return cls(topic, partition, offset, msg.timestamp()[1], msg.key(), msg.value(), header_list(msg))

    @property
    def coordinates(self) -> str:
        """``topic:partition:offset`` of this delivery."""
        return f"{self.topic}:{self.partition}:{self.offset}"

    @property
    def origin(self) -> str:
        """The input's identity: where it was first consumed (the ``aigc.origin`` header of a retried or
        replayed message), else this delivery's coordinates."""
        for key, value in reversed(self.headers):
            if key == ORIGIN and value:
                return value.decode("utf-8", "replace")
        return self.coordinates


@dataclass(frozen=True)
class Failure:
    """Why and when a stage gave up on a message: the facts a DeadLetter and its ``dlq.*`` headers carry."""

    stage: str
    kind: str  # ErrorKind value
    code: str
    message: str
    attempts: int
    first_failed_at: int
    last_failed_at: int

    @classmethod
    def of(cls, stage: str, exc: BaseException, attempts: int, first_failed_at: int, now_ms: int) -> Failure:
        """The failure ``exc`` stands for: its kind and code (permanent and the class name for an exception
        that is not a `PipelineError`), and its text cut to `MAX_ERROR_CHARS`."""
        kind = exc.kind.value if isinstance(exc, PipelineError) else "permanent"
        code = exc.code if isinstance(exc, PipelineError) else type(exc).__name__
        return cls(
            stage,
            kind,
            code,
            f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS],
            attempts,
            first_failed_at,
            now_ms,
        )


def failure_headers(original: Original, failure: Failure) -> Headers:
    """The original headers followed by the ``dlq.*`` headers that repeat ``failure``'s facts."""
    return [
        *original.headers,
        ("dlq.original.topic", original.topic.encode()),
        ("dlq.original.partition", str(original.partition).encode()),
        ("dlq.original.offset", str(original.offset).encode()),
        ("dlq.stage", failure.stage.encode()),
        ("dlq.error.kind", failure.kind.encode()),
        ("dlq.error.code", failure.code.encode()),
        ("dlq.error.message", failure.message[:500].encode()),
        ("dlq.attempts", str(failure.attempts).encode()),
        ("dlq.first.failed.at", str(failure.first_failed_at).encode()),
        ("dlq.last.failed.at", str(failure.last_failed_at).encode()),
    ]


def original_headers(original: Original) -> list[Header]:
    """The original message's headers as the records' ``headers`` field holds them, in order."""
    return [Header(key=k, value=v) for k, v in original.headers]


def dead_letter_record(
    original: Original, failure: Failure, request_id: str | None = None, tenant_id: str | None = None
) -> DeadLetter:
    """The DeadLetter record of ``original``, failed as ``failure`` says."""
    return DeadLetter(
        original_topic=original.topic,
        original_partition=original.partition,
        original_offset=original.offset,
        original_timestamp=original.timestamp_ms,
        key=original.key,
        value=original.value,
        headers=original_headers(original),
        stage=failure.stage,
        error_kind=failure.kind,
        error_code=failure.code,
        error_message=failure.message,
        attempts=failure.attempts,
        first_failed_at=failure.first_failed_at,
        last_failed_at=failure.last_failed_at,
        request_id=request_id,
        tenant_id=tenant_id,
    )


def dead_letter(
    codec: Codec,
    original: Original,
    failure: Failure,
    request_id: str | None = None,
    tenant_id: str | None = None,
    topic: str = "",
) -> tuple[bytes, Headers]:
    """The DeadLetter value and headers for ``original``; produce it keyed by the original key to
    ``topic`` (the stage's dead-letter topic, counted in the routing metrics under that name)."""
    value = codec.write(dead_letter_record(original, failure, request_id, tenant_id))
    metrics.dead_lettered(failure.stage, topic, failure.code)
    return value, failure_headers(original, failure)
