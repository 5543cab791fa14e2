"""The values of the gatekeeper's faust tables: stored with full names, and read in either shape.

The old shapes are copied from what the gatekeeper wrote before its table values had names
(`Gate._accept`/`_reject`, `_decision`, `ratelimit.take`, and the agent adding ``"p"``); the changelog
topics still hold such entries, and a restarted gatekeeper recovers its tables from them.
"""

from __future__ import annotations

import json

from schemas.records import ModerationVerdict
from stream_processors.gatekeeper.tables import Bucket, Decision, Seen, TypedTable

NOW = 1_700_000_000_000

OLD_ACCEPTED = {"o": "aigc.requests.normal:3:41", "t": NOW, "d": "A", "p": 3}
OLD_INVALID = {
    "o": "aigc.requests.low:0:7",
    "t": NOW,
    "d": "R",
    "x": {"status": "REJECTED", "reason_code": "INVALID_WIDTH", "message": "width: ...", "validated": False},
    "p": 0,
}
OLD_OVERLOADED = {
    "o": "aigc.requests.low:1:8",
    "t": NOW,
    "d": "R",
    "x": {
        "status": "REJECTED",
        "reason_code": "OVERLOADED",
        "message": "the LOW queue of pool default is over its bound; retry later",
        "validated": True,
        "retry_after_ms": 5000,
    },
    "p": 1,
}
OLD_MODERATED = {
    "o": "aigc.requests.high:2:9",
    "t": NOW,
    "d": "R",
    "x": {
        "status": "REJECTED",
        "reason_code": "MODERATED",
        "message": "prompt was blocked by the content policy (sexual)",
        "validated": True,
        "moderation": {
            "category": "sexual",
            "policy_version": "2026-12-06",
            "source": "prompt-linear",
            "field": "prompt",
            "reason": "SEXUAL_CONTENT",
            "model_version": "prompt-linear-0123456789ab",
            "score": 0.91,
            "scores": {"sexual": 0.91, "violence_gore": 0.02},
        },
    },
    "p": 2,
}
OLD_BUCKET = {"r": 998.0, "c": 1500.0, "t": 1700000000000.0}


def test_old_seen_entries_read_with_names() -> None:
    assert Seen.from_table(OLD_ACCEPTED) == Seen(
        origin="aigc.requests.normal:3:41", first_seen=NOW, partition=3
    )
    assert Seen.from_table(OLD_ACCEPTED).accepted
    invalid = Seen.from_table(OLD_INVALID)
    assert invalid.decision == Decision(
        status="REJECTED", reason_code="INVALID_WIDTH", message="width: ...", validated=False
    )
    assert (invalid.origin, invalid.first_seen, invalid.partition) == ("aigc.requests.low:0:7", NOW, 0)
    overloaded = Seen.from_table(OLD_OVERLOADED).decision
    assert overloaded is not None and overloaded.retry_after_ms == 5000 and overloaded.moderation is None
    moderated = Seen.from_table(OLD_MODERATED).decision
    assert moderated is not None and moderated.moderation == ModerationVerdict(
        category="sexual",
        policy_version="2026-12-06",
        source="prompt-linear",
        field="prompt",
        reason="SEXUAL_CONTENT",
        model_version="prompt-linear-0123456789ab",
        score=0.91,
        scores={"sexual": 0.91, "violence_gore": 0.02},
    )


def test_old_entries_read_after_a_trip_through_the_json_changelog() -> None:
    for old in (OLD_ACCEPTED, OLD_INVALID, OLD_OVERLOADED, OLD_MODERATED):
        assert Seen.from_table(json.loads(json.dumps(old))) == Seen.from_table(old)
    assert Bucket.from_table(json.loads(json.dumps(OLD_BUCKET))) == Bucket(998.0, 1500.0, float(NOW))


def test_new_entries_are_stored_with_full_names_and_read_back_equal() -> None:
    for old in (OLD_ACCEPTED, OLD_INVALID, OLD_OVERLOADED, OLD_MODERATED):
        seen = Seen.from_table(old)
        stored = json.loads(json.dumps(seen.to_table()))
        assert set(stored) == {"origin", "first_seen", "accepted", "decision", "partition"}
        assert Seen.from_table(stored) == seen
    bucket = Bucket.from_table(OLD_BUCKET)
    stored = json.loads(json.dumps(bucket.to_table()))
    assert stored == {"requests": 998.0, "cost": 1500.0, "counted_at": float(NOW)}
    assert Bucket.from_table(stored) == bucket


def test_a_typed_table_converts_on_the_way_in_and_out() -> None:
    raw: dict[str, dict] = {"a": OLD_ACCEPTED}
    table = TypedTable(raw, Seen)
    assert table["a"].origin == "aigc.requests.normal:3:41"
    assert table.get("missing") is None
    table["b"] = Seen(origin="t:0:1", first_seen=NOW, partition=0)
    assert raw["b"] == {
        "origin": "t:0:1",
        "first_seen": NOW,
        "accepted": True,
        "decision": None,
        "partition": 0,
    }
    assert sorted(k for k, _ in table.entries()) == ["a", "b"]
    del table["a"]
    assert list(raw) == ["b"] and len(table) == 1
