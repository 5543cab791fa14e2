"""How long a shed request is told to wait: the backlog's excess at the rate it drains."""

from __future__ import annotations

from stream_processors.gatekeeper.backlog import (
    DEFAULT_RETRY_AFTER_MS,
    MAX_RETRY_AFTER_MS,
    Backlog,
    retry_after_ms,
)


def test_retry_after_is_the_excess_at_the_drain_rate():
    assert retry_after_ms(Backlog(tasks=300, drained_per_s=50.0), bound=100) == 4_000


def test_retry_after_has_a_floor_a_ceiling_and_a_default_when_nothing_drains():
    assert retry_after_ms(Backlog(101, 1000.0), 100) == 1_000
    assert retry_after_ms(Backlog(10**9, 1.0), 100) == MAX_RETRY_AFTER_MS
    assert retry_after_ms(Backlog(500, 0.0), 100) == DEFAULT_RETRY_AFTER_MS
