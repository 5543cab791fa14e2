"""The gateway's pure rules: body to record, idempotency ids, partitioning, cursors, event ids, rate limit."""

from __future__ import annotations

import json
import uuid

import pytest

from plumbing.errors import DeliveryError, ValidationError
from plumbing.settings import RequestLimits
from plumbing.validation import validate_request
from producers.gateway.keys import KEY_PATTERN, digest, new_key
from producers.gateway.problems import problem_for
from producers.gateway.requests import (
    Position,
    RateLimiter,
    completion_json,
    decode_cursor,
    encode_cursor,
    frames_of,
    murmur2,
    partition_of,
    previous_month,
    progress_total,
    record_from_body,
    request_id_for,
    status_json,
)
from schemas.codec import default_codec
from schemas.records import Completion, GenerationRequest, Progress, StatusEvent, Timings

FIELDS = {"request_id", "tenant_id", "prompt"}


def record(body, fields=FIELDS):
    return record_from_body(
        body,
        tenant_id="acme",
        request_id="r1",
        created_at=1_700_000_000_000,
        default_model="tiny-sd",
        schema_fields=fields,
    )


def test_a_body_becomes_a_valid_encodable_request():
    image = record({"prompt": "a fox", "priority": "high"})
    assert image.kind == "IMAGE" and image.tenant_id == "acme" and image.priority == "HIGH"
    validate_request(image, RequestLimits(), ["tiny-sd"])
    video = record({"prompt": "waves", "video": {"num_frames": 8}, "steps": 5})
    assert video.kind == "VIDEO" and video.video is not None and video.video.fps == 8
    assert progress_total(frames_of(video), video.steps) == 40
    assert progress_total(frames_of(image), image.steps) == 20
    codec = default_codec()
    for r in (image, video):
        assert codec.read(codec.write(r), GenerationRequest) == r


def test_a_body_with_wrong_types_is_refused_by_validation_naming_the_field():
    for body, field in (
        ({"prompt": "x", "width": "wide"}, "width"),
        ({"prompt": "x", "video": {"fps": 8}}, "video.num_frames"),
        ({"width": 64}, "prompt"),
        ({"prompt": "x", "priority": "urgent"}, "priority"),
    ):
        with pytest.raises(ValidationError) as err:
            validate_request(record(body), RequestLimits(), ["tiny-sd"])
        assert err.value.field == field


def test_sse_payloads_are_the_records_avro_fields():
    codec = default_codec()
    status = StatusEvent(
        request_id="r1", tenant_id="acme", stage="renderer", state="RUNNING", task_id="r1.0",
        progress=Progress(done=2, total=4), at=5,
    )  # fmt: skip
    assert status_json(status, 2, 8) == {**codec.decode(codec.write(status)), "done": 2, "request_total": 8}
    assert list(status_json(status, 2, 8))[:3] == ["request_id", "tenant_id", "stage"]
    completion = Completion(
        request_id="r1", tenant_id="acme", status="FAILED", timings=Timings(), finished_at=9
    )
    assert completion_json(completion, None) == codec.decode(codec.write(completion))
    assert completion_json(completion, [{"url": "u"}])["outputs"] == [{"url": "u"}]


def test_the_body_cannot_choose_its_tenant_or_add_unknown_fields():
    for body, field in (
        ({"prompt": "x", "tenant_id": "other"}, "tenant_id"),
        ({"prompt": "x", "request_id": "mine"}, "request_id"),
        ({"prompt": "x", "video": {"num_frames": 4, "speed": 2}}, "video.speed"),
        ([1, 2], "body"),
        ({"prompt": "x", "webhook_url": "ftp://h"}, "webhook_url"),
    ):
        with pytest.raises(ValidationError) as err:
            record(body)
        assert err.value.field == field


def test_webhook_url_goes_on_the_record_only_when_the_schema_has_it():
    assert record({"prompt": "x", "webhook_url": "https://h/x"}).webhook_url is None
    with_field = record({"prompt": "x", "webhook_url": "https://h/x"}, FIELDS | {"webhook_url"})
    assert with_field.webhook_url == "https://h/x"


def test_idempotency_keys_are_scoped_by_tenant():
    assert request_id_for("a", "k") == request_id_for("a", "k") != request_id_for("b", "k")
    assert len(request_id_for("a", "k")) == 32 and request_id_for("a", None) != request_id_for("a", None)
    with pytest.raises(ValidationError):
        request_id_for("a", "")


def test_a_new_request_id_is_a_uuid4_in_hex():
    for _ in range(200):
        rid = request_id_for("a", None)
        parsed = uuid.UUID(rid)
        assert parsed.hex == rid and parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_problems_for_exceptions_name_the_field_and_status():
    invalid = problem_for(ValidationError("width", "must be a multiple of 8"))
    assert (invalid.status, invalid.field) == (400, "width")
    body, headers = problem_for(DeliveryError("r1: timed out")).raw()
    assert json.loads(body)["status"] == 503 and (b"retry-after", b"1") in headers
    assert (b"content-type", b"application/problem+json") in headers
    assert problem_for(json.JSONDecodeError("x", "doc", 0)).field == "body"
    assert problem_for(RuntimeError("boom")).status == 500


def test_murmur2_matches_kafkas_java_partitioner():
    # Vectors from Kafka's UtilsTest.testMurmur2.
    cases = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    for data, expected in cases.items():
        assert murmur2(data) == expected, data
    assert 0 <= partition_of("some-request", 6) < 6


def test_cursors_and_event_ids_round_trip_and_refuse_garbage():
    cursor = encode_cursor("2026-12", 1_700_000_000_123, "abc")
    assert decode_cursor(cursor) == ("2026-12", 1_700_000_000_123, "abc")
    for bad in ("", "!!", encode_cursor("2026-12", 1, "a b")):
        with pytest.raises(ValidationError):
            decode_cursor(bad)
    assert previous_month("2026-01") == "2025-12" and previous_month("2026-11") == "2026-10"
    assert Position.parse(str(Position(12, 3))) == Position(12, 3)
    for bad in ("x", "1", "-1.2"):
        with pytest.raises(ValidationError):
            Position.parse(bad)


def test_rate_limiter_allows_the_burst_then_says_how_long_to_wait():
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3.0, clock=lambda: now[0])
    assert [limiter.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("k") == pytest.approx(0.5)
    assert limiter.take("other") == 0.0
    now[0] = 0.5
    assert limiter.take("k") == 0.0


def test_keys_are_high_entropy_and_only_their_hash_is_kept():
    key_id, key = new_key()
    match = KEY_PATTERN.fullmatch(key)
    assert match and match.group(1) == key_id
    assert digest(key) != key and len(digest(key)) == 64 and new_key()[1] != key
