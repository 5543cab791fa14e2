"""The one clock of the pipeline's records: epoch milliseconds (UTC), as every ``*_at`` field holds."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Epoch milliseconds now (UTC), the unit of every timestamp field in the schemas."""
    return time.time_ns() // 1_000_000


def monotonic_ms() -> float:
    """Milliseconds of a clock that never steps back: for durations and deadlines inside one process."""
    return time.monotonic_ns() / 1_000_000
