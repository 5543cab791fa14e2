"""Per-tenant token buckets for request rate and render cost, as pure functions over plain state.

State is a `Bucket` (request tokens, cost tokens, the epoch ms they were counted at) kept in a
changelogged faust table keyed by tenant, so a restarted gatekeeper resumes with the tokens it had. A
request is admitted only if both buckets hold enough; a refused request takes no tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from plumbing.settings import Tier
from stream_processors.gatekeeper.tables import Bucket


@dataclass(frozen=True)
class Take:
    """The outcome of `take`: whether the request may go, and the tenant's buckets after it."""

    allowed: bool
    state: Bucket
    retry_after_ms: int | None = None
    reason: str | None = None  # RATE_LIMITED, or COST_EXCEEDS_TIER when no wait would ever be enough


def _refill(state: Bucket | None, tier: Tier, now_ms: float) -> tuple[float, float]:
    if state is None:
        return tier.request_burst, tier.cost_burst
    elapsed_s = max(0.0, (now_ms - state.counted_at) / 1000.0)
    return (
        min(tier.request_burst, state.requests + elapsed_s * tier.requests_per_s),
        min(tier.cost_burst, state.cost + elapsed_s * tier.cost_per_s),
    )


def level(state: Bucket | None, tier: Tier, now_ms: float) -> tuple[float, float]:
    """The request and cost tokens a bucket holds at ``now_ms`` (refilled since its last use)."""
    return _refill(state, tier, max(float(now_ms), state.counted_at) if state else float(now_ms))


def take(state: Bucket | None, tier: Tier, cost: float, now_ms: int) -> Take:
    """Try to take one request token and ``cost`` cost tokens at ``now_ms``."""
    # The bucket's clock never goes back (another gatekeeper's clock after a rebalance may be behind):
    # a backwards step stored as counted_at would credit the same span twice once time moves on.
    now = max(float(now_ms), state.counted_at) if state else float(now_ms)
    requests, budget = _refill(state, tier, now)
    refilled = Bucket(requests, budget, now)
    if cost > tier.cost_burst:
        return Take(False, refilled, None, "COST_EXCEEDS_TIER")
    if requests >= 1.0 and budget >= cost:
        return Take(True, Bucket(requests - 1.0, budget - cost, now))
    wait_s = max((1.0 - requests) / tier.requests_per_s, (cost - budget) / tier.cost_per_s, 0.0)
    retry_ms = max(1, math.ceil(wait_s * 1000))
    # Float rounding can leave the refill at exactly retry_ms a hair short (0.1 + 0.3 * 3 < 1): one more
    # millisecond covers it, so a client that waits retry_after_ms is not refused again. A refusal stores
    # nothing, so the next try refills from ``state``, not from ``refilled`` (whose sum rounds otherwise).
    later_requests, later_budget = _refill(state, tier, now + retry_ms)
    if later_requests < 1.0 or later_budget < cost:
        retry_ms += 1
    return Take(False, refilled, retry_ms, "RATE_LIMITED")
