"""The one backoff policy: how long to wait before the next try, growing with each failure.

Each user names its own `Backoff` (the constants are settings of that place, and say what they are for);
the shape is the same everywhere: ``first_s * factor ** (failures - 1)``, capped at ``max_s``, with an
optional random spread so many clients that failed together do not come back together.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: the wait after the n-th consecutive failure (n >= 1)."""

    first_s: float
    max_s: float
    factor: float = 2.0
    jitter: float = 0.0  # 0.2 spreads each wait uniformly over +-20%

    def delay_s(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failures (0 or less waits nothing)."""
        if failures <= 0:
            return 0.0
        delay = min(self.max_s, self.first_s * self.factor ** (failures - 1))
        if self.jitter:
            delay *= 1.0 + random.uniform(-self.jitter, self.jitter)
        return max(0.0, delay)
