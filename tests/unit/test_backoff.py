"""The shared backoff policy and clock."""

from __future__ import annotations

import time

import pytest

from plumbing.backoff import Backoff
from plumbing.clock import monotonic_ms, now_ms


def test_backoff_doubles_from_the_first_wait_up_to_the_cap() -> None:
    policy = Backoff(first_s=0.5, max_s=3.0)
    assert [policy.delay_s(n) for n in range(6)] == [0.0, 0.5, 1.0, 2.0, 3.0, 3.0]


def test_backoff_jitter_stays_within_its_spread() -> None:
    policy = Backoff(first_s=1.0, max_s=10.0, jitter=0.2)
    waits = [policy.delay_s(2) for _ in range(200)]
    assert all(1.6 <= w <= 2.4 for w in waits)
    assert len(set(waits)) > 1


def test_clock_is_epoch_milliseconds() -> None:
    assert now_ms() == pytest.approx(time.time() * 1000, abs=50)
    first = monotonic_ms()
    assert monotonic_ms() >= first
