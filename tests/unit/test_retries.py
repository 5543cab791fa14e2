"""Where failed work goes: retry topics with growing delays, then the dead-letter topic."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException

from plumbing.dead_letters import Original
from plumbing.errors import BackPressure, DecodeError, ErrorKind, RetryableError, classify
from plumbing.headers import ATTEMPTS, FIRST_FAILED_AT, ORIGIN
from plumbing.retries import prior_attempts, route_failure
from plumbing.settings import RetrySettings, Settings
from plumbing.topics import Stage, Topics
from schemas.codec import default_codec

NOW = 1_800_000_000_000
SETTINGS = Settings.load()
TOPICS = Topics(SETTINGS)
RETRY = RetrySettings(delays_s=(1.0, 10.0, 60.0), max_attempts=4)
codec = default_codec()


def message(attempts: int | None = None, first: int | None = None, origin: str | None = None) -> Original:
    headers: list[tuple[str, bytes | None]] = [("traceparent", b"00-abc")]
    if attempts is not None:
        headers.append((ATTEMPTS, str(attempts).encode()))
    if first is not None:
        headers.append((FIRST_FAILED_AT, str(first).encode()))
    if origin is not None:
        headers.append((ORIGIN, origin.encode()))
    return Original("aigc.render.default.low", 3, 42, NOW - 10, b"req-1", b"\xc3\x01payload", headers)


def route(original: Original, exc: BaseException):
    return route_failure(codec, TOPICS, RETRY, Stage.RENDERER, original, exc, NOW, "req-1", "acme")


@pytest.mark.parametrize(("attempts", "topic_delay"), [(None, 1.0), (1, 10.0), (2, 60.0)])
def test_retryable_work_goes_to_the_next_delay(attempts, topic_delay):
    routed = route(message(attempts, NOW - 5000 if attempts else None), RetryableError("S3 timed out"))
    assert routed is not None and not routed.dead
    assert routed.topic == TOPICS.retry(Stage.RENDERER, topic_delay)
    envelope = codec.decode(routed.value, "RetryEnvelope")
    assert envelope["attempts"] == (attempts or 0) + 1
    assert envelope["due_at"] == NOW + int(topic_delay * 1000)
    assert envelope["value"] == b"\xc3\x01payload" and envelope["key"] == b"req-1"
    assert envelope["first_failed_at"] == (NOW - 5000 if attempts else NOW)
    # The retry headers are not copied into the envelope: the relay sets fresh ones.
    assert {h["key"] for h in envelope["headers"]} == {"traceparent"}


def test_the_last_attempt_is_dead_lettered_with_the_count():
    routed = route(message(attempts=3, first=NOW - 71_000), RetryableError("S3 timed out"))
    assert routed is not None and routed.dead and routed.topic == TOPICS.dlq(Stage.RENDERER)
    letter = codec.decode(routed.value, "DeadLetter")
    assert letter["attempts"] == 4 and letter["first_failed_at"] == NOW - 71_000
    assert letter["error_kind"] == "retryable" and "gave up after 4 attempts" in letter["error_message"]
    assert letter["value"] == b"\xc3\x01payload"
    assert (letter["original_topic"], letter["original_partition"], letter["original_offset"]) == (
        "aigc.render.default.low",
        3,
        42,
    )
    assert letter["request_id"] == "req-1" and letter["tenant_id"] == "acme"


def test_permanent_work_is_dead_lettered_at_once():
    routed = route(message(), DecodeError("garbage", code="BAD_MARKER"))
    assert routed is not None and routed.dead
    letter = codec.decode(routed.value, "DeadLetter")
    assert (letter["error_kind"], letter["error_code"], letter["attempts"]) == ("permanent", "BAD_MARKER", 1)
    assert dict(routed.headers)["dlq.error.code"] == b"BAD_MARKER"


def test_back_pressure_is_routed_nowhere_and_unknown_errors_are_raised():
    assert route(message(), BackPressure("cassandra is down")) is None
    with pytest.raises(KeyError):
        route(message(), KeyError("a bug"))


def test_attempts_and_origin_come_from_the_headers():
    assert prior_attempts(message()) == 0
    assert prior_attempts(message(attempts=2)) == 2
    assert message().origin == "aigc.render.default.low:3:42"
    assert message(origin="aigc.render.default.low:0:7").origin == "aigc.render.default.low:0:7"


def test_kafka_errors_are_classified_by_their_class_not_their_module():
    # KafkaException lives in the C module ``cimpl``: a check on the module name never matched it, so a
    # timed-out transaction call crashed the sink instead of being aborted and tried again.
    timed_out = KafkaException(KafkaError(KafkaError._TIMED_OUT))
    fenced = KafkaException(KafkaError(KafkaError._FENCED, fatal=True))
    assert classify(timed_out) is ErrorKind.RETRYABLE
    assert classify(fenced) is None
    # as a poll or a delivery report hands a fatal error back: its code, without the fatal flag
    assert classify(KafkaException(KafkaError(KafkaError._FATAL, "static consumer fenced"))) is None
    assert route(message(), timed_out) is not None
