"""The pure parts of `aigc dlq` and `aigc check`: filters, times, previews, pacing, replay headers,
re-validation, and the report's verdict. No I/O: records are built with the real codec."""

from __future__ import annotations

from typing import Any

import pytest

from plumbing.dead_letters import Failure, Original, dead_letter
from plumbing.headers import ATTEMPTS, FIRST_FAILED_AT, ORIGIN, REPLAYED_FROM
from plumbing.settings import KafkaSettings, Settings
from plumbing.topics import Stage, Topics
from producers.checker import DeliveryReport, _months, dead_letter_ids
from producers.dlq import (
    DeadLetterEntry,
    Filters,
    Pacer,
    count,
    describe_value,
    preview,
    replay_headers,
    revalidate,
)
from producers.ops_cli import parse_time
from schemas.codec import default_codec
from schemas.records import DeadLetter, GenerationRequest, Header, StatusEvent

NOW = 1_800_000_000_000
SETTINGS = Settings.load(kafka=KafkaSettings(topic_prefix="aigc"))
TOPICS = Topics(SETTINGS)
codec = default_codec()


def request(**fields: Any) -> GenerationRequest:
    base = dict(request_id="r0", tenant_id="acme", kind="IMAGE", prompt="a kite", model="tiny-sd")
    sizes = dict(width=64, height=64, steps=4, guidance_scale=7.0, created_at=NOW - 1000)
    return GenerationRequest(**{**base, **sizes, **fields})


def entry(
    value: bytes | None,
    *,
    topic: str = "aigc.requests.normal",
    stage: str = "gatekeeper",
    kind: str = "permanent",
    code: str = "UNDECODABLE",
    last: int = NOW,
    ids: tuple[str | None, str | None] = (None, None),
    headers: list[tuple[str, bytes | None]] | None = None,
    offset: int = 7,
) -> DeadLetterEntry:
    original = Original(topic, 1, 17, NOW - 5000, b"acme", value, headers or [])
    failure = Failure(stage, kind, code, "boom", 1, last - 10, last)
    record = codec.read(dead_letter(codec, original, failure, *ids)[0], DeadLetter)
    return DeadLetterEntry(
        f"aigc.dlq.{stage}", 0, offset, last, record, None, *dead_letter_ids(record, codec)
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1800000000000", 1_800_000_000_000),
        ("2027-01-15T08:00:00Z", 1_800_000_000_000),
        ("2027-01-15T08:00:00", 1_800_000_000_000),  # naive times are UTC
        ("2027-01-15T09:00:00+01:00", 1_800_000_000_000),
        ("2027-01-15T08:00:00.250Z", 1_800_000_000_250),
    ],
)
def test_times_are_epoch_ms_or_iso_8601(text: str, expected: int) -> None:
    assert parse_time(text) == expected


@pytest.mark.parametrize("text", ["yesterday", "", "2027-13-01", "-5"])
def test_other_times_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="neither epoch milliseconds nor an ISO 8601 time"):
        parse_time(text)


def test_filters_match_each_field_and_combine() -> None:
    valid = codec.write(request(request_id="r1"))
    by_value = entry(valid, kind="retryable", code="STORE_UNAVAILABLE")  # ids found in the value
    assert (by_value.request_id, by_value.tenant_id) == ("r1", "acme")
    garbage = entry(b"\x00junk", last=NOW - 10_000)
    assert (garbage.request_id, garbage.tenant_id) == (None, None)
    renderer = entry(valid, stage="renderer", topic="aigc.render.default.normal", ids=("r2", "globex"))
    assert Filters().matches(garbage)
    assert Filters(stages=["renderer"]).matches(renderer)
    assert not Filters(stages=["renderer"]).matches(by_value)
    assert Filters(error_kinds=["retryable"]).matches(by_value)
    assert not Filters(error_kinds=["retryable"]).matches(garbage)
    assert Filters(error_codes=["UNDECODABLE"]).matches(garbage)
    assert Filters(tenants=["acme"]).matches(by_value) and not Filters(tenants=["acme"]).matches(renderer)
    assert Filters(request_ids=["r2"]).matches(renderer) and not Filters(request_ids=["r2"]).matches(garbage)
    assert Filters(since_ms=NOW - 5000).matches(by_value)
    assert not Filters(since_ms=NOW - 5000).matches(garbage)
    assert Filters(until_ms=NOW - 5000).matches(garbage)
    assert not Filters(until_ms=NOW).matches(by_value)  # until is exclusive
    assert not Filters(tenants=["acme"], error_kinds=["permanent"]).matches(by_value)


def test_a_message_that_is_no_dead_letter_matches_only_topic_filters() -> None:
    junk = DeadLetterEntry("aigc.dlq.assembler", 0, 3, NOW, None, "not a DeadLetter (BAD_MARKER)")
    assert junk.stage == "assembler"
    assert Filters().matches(junk) and Filters(stages=["assembler"]).matches(junk)
    assert not Filters(error_codes=["BAD_MARKER"]).matches(junk)
    assert not Filters(since_ms=0).matches(junk)


def test_filters_read_only_the_chosen_stages_topics() -> None:
    assert Filters().topics(TOPICS) == [TOPICS.dlq(s) for s in Stage]
    assert Filters(stages=["renderer"]).topics(TOPICS) == ["aigc.dlq.renderer"]


def test_preview_shows_printable_bytes_and_escapes_the_rest() -> None:
    assert preview(None) == "(null)"
    assert preview(b"ab\\c\x00\xff\n") == "7 bytes: ab\\x5cc\\x00\\xff\\x0a"
    long = preview(b"x" * 250)
    assert long == "250 bytes: " + "x" * 200 + " ... (+50 bytes)"


def test_describe_value_decodes_with_the_codec_or_previews() -> None:
    text = describe_value(codec, codec.write(request(prompt="一只猫")))
    assert text.startswith("GenerationRequest\n{")
    assert '"prompt": "一只猫"' in text  # readable, not \\u-escaped
    assert describe_value(codec, b"\xc3\x01\x00").startswith("undecodable (TRUNCATED")


def test_pacing_spaces_sends_by_one_over_the_rate() -> None:
    clock = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    pacer = Pacer(20, clock=lambda: clock[0], sleep=sleep)
    for _ in range(10):
        pacer.wait()
    assert slept == pytest.approx([0.05] * 9)
    clock[0] += 1.0  # idle for a while: the next send goes at once, without a burst after it
    pacer.wait()
    pacer.wait()
    assert slept[9:] == pytest.approx([0.05])
    with pytest.raises(ValueError, match="positive"):
        Pacer(0)


def test_replay_headers_drop_attempts_keep_the_rest_and_name_the_dead_letter() -> None:
    headers = [
        Header(key="traceparent", value=b"00-abc"),
        Header(key=ATTEMPTS, value=b"3"),
        Header(key=FIRST_FAILED_AT, value=b"123"),
        Header(key="empty", value=None),
    ]
    assert replay_headers(headers, "aigc.dlq.gatekeeper:0:9", "aigc.requests.high:1:4") == [
        ("traceparent", b"00-abc"),
        ("empty", None),
        (ORIGIN, b"aigc.requests.high:1:4"),
        (REPLAYED_FROM, b"aigc.dlq.gatekeeper:0:9"),
    ]
    retried = [*headers, Header(key=ORIGIN, value=b"aigc.requests.high:0:1")]
    assert replay_headers(retried, "d:0:1", "aigc.requests.high:1:4")[-2:] == [
        (ORIGIN, b"aigc.requests.high:0:1"),  # the input's first coordinates survive
        (REPLAYED_FROM, b"d:0:1"),
    ]


def test_revalidation_against_todays_schemas_and_rules() -> None:
    good = entry(codec.write(request()))
    assert revalidate(good, SETTINGS, codec, NOW) is None
    retired = entry(codec.write(request(model="retired")))
    assert (revalidate(retired, SETTINGS, codec, NOW) or "").startswith("invalid request (UNKNOWN_MODEL")
    assert (revalidate(entry(b"\x00junk-junk-junk"), SETTINGS, codec, NOW) or "").startswith(
        "undecodable with today's schemas (BAD_MARKER"
    )
    status = codec.write(
        StatusEvent(request_id="r", tenant_id="t", stage="gatekeeper", state="ACCEPTED", at=NOW)
    )
    assert revalidate(entry(status), SETTINGS, codec, NOW) == (
        "aigc.requests.normal carries GenerationRequest, not StatusEvent"
    )
    junk = DeadLetterEntry("aigc.dlq.assembler", 0, 3, NOW, None, "not a DeadLetter (BAD_MARKER)")
    assert revalidate(junk, SETTINGS, codec, NOW) == "not a DeadLetter (BAD_MARKER)"


def test_counts_by_stage_kind_and_code() -> None:
    entries = [
        entry(b"x", code="BAD_MARKER"),
        entry(b"x", code="BAD_MARKER", offset=8),
        entry(b"x", stage="renderer", kind="retryable", code="TRANSIENT"),
        DeadLetterEntry("aigc.dlq.assembler", 0, 3, NOW, None, "not a DeadLetter"),
    ]
    counts = count(entries)
    assert counts.total == 4 and counts.not_dead_letters == 1
    assert counts.by_stage_kind == {
        ("gatekeeper", "permanent"): 2,
        ("renderer", "retryable"): 1,
        ("assembler", "(undecodable)"): 1,
    }
    assert counts.by_code == {"BAD_MARKER": 2, "TRANSIENT": 1, "(undecodable)": 1}
    assert counts.format().splitlines()[-3].split() == ["BAD_MARKER", "2"]  # most frequent first


def test_report_is_ok_only_when_nothing_is_wrong() -> None:
    clean = DeliveryReport(3, {"SUCCEEDED": 2}, 1, [], {}, [], [], [])
    assert clean.ok and clean.summary().startswith("delivery check: OK")
    assert not DeliveryReport(1, {}, 0, ["r"], {}, [], [], []).ok
    assert not DeliveryReport(1, {"SUCCEEDED": 1}, 0, [], {"r": 2}, [], [], []).ok
    assert not DeliveryReport(1, {}, 0, [], {}, ["r"], [], []).ok
    assert not DeliveryReport(1, {}, 0, [], {}, [], ["s3://b/k"], []).ok
    assert not DeliveryReport(1, {}, 0, [], {}, [], [], ["r: row FAILED, completion SUCCEEDED"]).ok
    assert not DeliveryReport(1, {}, 0, [], {}, [], [], [], unfinished=["t:0"]).ok
    text = DeliveryReport(2, {}, 0, ["r1", "r2"], {}, [], [], [], last_status={"r1": "RUNNING"}).summary()
    assert "lost: 2" in text and "r1  (last status RUNNING)" in text and "r2  (last status -)" in text


def test_tenant_index_months_span_the_window() -> None:
    from datetime import UTC, datetime

    assert _months(datetime(2026, 11, 30, tzinfo=UTC), datetime(2027, 2, 1, tzinfo=UTC)) == [
        "2026-11",
        "2026-12",
        "2027-01",
        "2027-02",
    ]
