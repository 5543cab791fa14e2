"""Where failed work goes: one function every stage calls with the message it could not handle.

- back-pressure: nowhere; the caller pauses and tries again in place (None is returned);
- retryable, with attempts left: a RetryEnvelope on ``aigc.retry.<stage>.<delay>``, the delay growing
  with each attempt (settings ``retry.delays_s``); the retry relay sends the message back when due;
- retryable with no attempts left, or permanent: a DeadLetter on ``aigc.dlq.<stage>``;
- unknown (`classify` returns None): the exception is raised again, so the stage crashes and the message
  is redelivered after a fix instead of being dead-lettered by mistake.

Attempts travel with the message in the ``aigc.attempts`` and ``aigc.first_failed_at`` headers that the
relay sets, so the count survives any number of round trips.
"""

from __future__ import annotations

from dataclasses import dataclass

from plumbing import metrics, tracing
from plumbing.dead_letters import Failure, Original, dead_letter, original_headers
from plumbing.errors import ErrorKind, PipelineError, classify
from plumbing.headers import ATTEMPTS, FIRST_FAILED_AT, Headers
from plumbing.settings import RetrySettings
from plumbing.topics import Stage, Topics
from schemas.codec import Codec
from schemas.records import RetryEnvelope


@dataclass(frozen=True)
class Routed:
    """A message to produce instead of the one that failed (keyed by the original key)."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Headers
    dead: bool  # True for a dead letter, False for a retry


def _int_header(original: Original, name: str) -> int | None:
    for key, value in reversed(original.headers):
        if key == name and value:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def prior_attempts(original: Original) -> int:
    """Attempts that already failed before this delivery (0 on a first attempt)."""
    return max(0, _int_header(original, ATTEMPTS) or 0)


def route_failure(
    codec: Codec,
    topics: Topics,
    retry: RetrySettings,
    stage: Stage,
    original: Original,
    exc: BaseException,
    now_ms: int,
    request_id: str | None = None,
    tenant_id: str | None = None,
) -> Routed | None:
    """Where ``exc``, raised while handling ``original``, sends it: a retry, a dead letter, or nowhere
    (None: back-pressure, try again in place); an exception `classify` does not know is raised again."""
    kind = classify(exc)
    if kind is None:
        raise exc
    if kind is ErrorKind.BACKPRESSURE:
        return None
    attempts = prior_attempts(original) + 1
    first_failed_at = _int_header(original, FIRST_FAILED_AT) or now_ms
    failure = Failure.of(stage, exc, attempts, first_failed_at, now_ms)
    if kind is not ErrorKind.RETRYABLE or attempts >= retry.max_attempts:
        if kind is ErrorKind.RETRYABLE:  # out of attempts: say so in the dead letter
            failure = Failure(
                stage,
                kind.value,
                _code(exc),
                f"gave up after {attempts} attempts: {failure.message}",
                attempts,
                first_failed_at,
                now_ms,
            )
        topic = topics.dlq(stage)
        value, headers = dead_letter(codec, original, failure, request_id, tenant_id, topic)
        tracing.failure(original.headers, stage.value, "DEAD_LETTERED", topic, failure.code, exc)
        return Routed(topic, original.key, value, headers, dead=True)
    delay_s = retry.delays_s[min(attempts, len(retry.delays_s)) - 1]
    envelope = RetryEnvelope(
        original_topic=original.topic,
        original_partition=original.partition,
        original_offset=original.offset,
        key=original.key,
        value=original.value,
        headers=[h for h in original_headers(original) if h.key not in (ATTEMPTS, FIRST_FAILED_AT)],
        stage=stage.value,
        error_kind=kind.value,
        error_code=_code(exc),
        error_message=failure.message,
        attempts=attempts,
        first_failed_at=first_failed_at,
        last_failed_at=now_ms,
        due_at=now_ms + int(delay_s * 1000),
    )
    retry_headers: Headers = [("dlq.stage", stage.value.encode()), ("dlq.attempts", str(attempts).encode())]
    metrics.routed(stage.value, topics.retry(stage, delay_s), _code(exc))
    tracing.failure(original.headers, stage.value, "RETRYING", topics.retry(stage, delay_s), _code(exc), exc)
    return Routed(
        topics.retry(stage, delay_s),
        original.key,
        codec.write(envelope),
        retry_headers,
        dead=False,
    )


def _code(exc: BaseException) -> str:
    return exc.code if isinstance(exc, PipelineError) else type(exc).__name__
