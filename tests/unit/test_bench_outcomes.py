"""Benchmarks account for every request they send: each ends in an outcome, none is dropped silently."""

from __future__ import annotations

from bench.harness import RequestTiming, outcomes


def timing(status: str | None = None, reason: str | None = None) -> RequestTiming:
    return RequestTiming("r", "LOW", 1, 0, status=status, reason=reason)


def test_every_request_is_counted_by_how_it_ended() -> None:
    sent = [
        timing("SUCCEEDED"),
        timing("SUCCEEDED"),
        timing("REJECTED", "OVERLOADED"),
        timing("REJECTED", "RATE_LIMITED"),
        timing("REJECTED", "OVERLOADED"),
        timing("EXPIRED", "DEADLINE_EXCEEDED"),
        timing(),  # nothing came back within the wait
    ]
    counted = outcomes(sent)
    assert counted == {
        "SUCCEEDED": 2,
        "REJECTED OVERLOADED": 2,
        "REJECTED RATE_LIMITED": 1,
        "EXPIRED DEADLINE_EXCEEDED": 1,
        "NO ANSWER": 1,
    }
    assert sum(counted.values()) == len(sent)
