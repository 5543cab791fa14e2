"""The gatekeeper's metrics and readiness: what the faust agent calls after each decision.

- ``aigc_gatekeeper_requests_total{priority, decision, reason}``: every consumed request, by the class of
  the topic it came from, its decision (accepted, rejected, duplicate, expired, cancelled, dead_lettered,
  retrying) and the reason code ("" when accepted or a duplicate);
- ``aigc_gatekeeper_moderation_blocks_total{category}``: prompts blocked by moderation, by category;
- ``aigc_gatekeeper_admission_seconds{priority}``: from the request's Kafka timestamp to its outputs sent;
- ``aigc_gatekeeper_bucket_tokens{tenant, kind}``: the token buckets of the ``observability.bucket_top_n``
  tenants with the fewest tokens left (refilled to now at each scrape), so the tenant label stays bounded.

Readiness: ``moderation`` once the moderator is built, ``assigned`` from the end of each faust rebalance
(table recovery included, the moment faust logs "Worker ready") until the next one starts.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import faust
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from plumbing.clock import now_ms
from plumbing.observability import LATENCY_BUCKETS, Readiness, bounded, enabled
from plumbing.settings import MODERATION_CATEGORIES, Tier
from stream_processors.gatekeeper import ratelimit
from stream_processors.gatekeeper.admission import Admission
from stream_processors.gatekeeper.tables import Bucket

REQUESTS = Counter(
    "aigc_gatekeeper_requests",
    "Requests the gatekeeper decided, by class, decision and reason code",
    ["priority", "decision", "reason"],
)
MODERATION_BLOCKS = Counter(
    "aigc_gatekeeper_moderation_blocks", "Requests blocked by prompt moderation, by category", ["category"]
)
ADMISSION_SECONDS = Histogram(
    "aigc_gatekeeper_admission_seconds",
    "From the request's Kafka timestamp to its decision sent",
    ["priority"],
    buckets=LATENCY_BUCKETS,
)
DECISIONS = {
    "ACCEPTED": "accepted",
    "REJECTED": "rejected",
    "DUPLICATE": "duplicate",
    "EXPIRED": "expired",
    "CANCELLED": "cancelled",
    "DEAD_LETTERED": "dead_lettered",
    "RETRYING": "retrying",
}
MAX_TRACKED_TENANTS = 10_000  # buckets remembered for the top-N gauge; the least recently used go first
_PRIORITY_OF_SUFFIX = {"high": "HIGH", "normal": "NORMAL", "low": "LOW"}


def topic_priority(topic: str) -> str:
    """The class of a request topic (``<prefix>.requests.<class>``)."""
    return _PRIORITY_OF_SUFFIX.get(topic.rsplit(".", 1)[-1], "NORMAL")


class BucketLevels(Collector):
    """The last token-bucket state of recently seen tenants, exported for the N emptiest only."""

    def __init__(self, top_n: int, tier_of: Callable[[str], Tier]) -> None:
        self.top_n = top_n
        self.tier_of = tier_of
        self.states: collections.OrderedDict[str, Bucket] = collections.OrderedDict()
        self.lock = threading.Lock()

    def update(self, tenant_id: str, state: Bucket) -> None:
        """Remember ``state`` as the tenant's latest buckets (forgetting the least recently seen tenant)."""
        with self.lock:
            self.states[tenant_id] = state
            self.states.move_to_end(tenant_id)
            if len(self.states) > MAX_TRACKED_TENANTS:
                self.states.popitem(last=False)

    def levels(self, now_ms: float) -> list[tuple[str, float, float]]:
        """(tenant, request tokens, cost tokens) now, the emptiest ``top_n`` first (by request tokens
        relative to the burst, then cost tokens relative to theirs)."""
        with self.lock:
            states = list(self.states.items())
        rows = []
        for tenant, state in states:
            tier = self.tier_of(tenant)
            requests, cost = ratelimit.level(state, tier, now_ms)
            rows.append((min(requests / tier.request_burst, cost / tier.cost_burst), tenant, requests, cost))
        rows.sort()
        return [(tenant, requests, cost) for _, tenant, requests, cost in rows[: self.top_n]]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        """The gauge family of the emptiest tenants' tokens, refilled to now (prometheus_client calls it)."""
        family = GaugeMetricFamily(
            "aigc_gatekeeper_bucket_tokens",
            "Tokens left in the buckets of the tenants closest to their limits (top N only)",
            labels=["tenant", "kind"],
        )
        for tenant, requests, cost in self.levels(now_ms()):
            family.add_metric([tenant, "requests"], requests)
            family.add_metric([tenant, "cost"], cost)
        yield family


class GatekeeperMetrics:
    """The gatekeeper's decision metrics, and the bucket gauges when a tier lookup is given."""

    def __init__(self, top_n: int = 20, tier_of: Callable[[str], Tier] | None = None) -> None:
        self.buckets = BucketLevels(top_n, tier_of) if tier_of is not None and top_n > 0 else None
        if self.buckets is not None:
            REGISTRY.register(self.buckets)

    def decided(self, admission: Admission, topic: str, timestamp_s: float | None) -> None:
        """Count one decision of a request consumed from ``topic`` at Kafka time ``timestamp_s``."""
        if not enabled():
            return
        priority = topic_priority(topic)
        decision = DECISIONS.get(admission.verdict, "other")
        reason = (admission.reason or "") if decision != "accepted" else ""
        REQUESTS.labels(priority, decision, reason if len(reason) <= 64 else "other").inc()
        terminal = admission.seen.decision if admission.seen is not None else None
        if admission.reason == "MODERATED" and terminal is not None:
            category = terminal.moderation.category if terminal.moderation is not None else None
            MODERATION_BLOCKS.labels(bounded(category, MODERATION_CATEGORIES)).inc()
        if timestamp_s:
            ADMISSION_SECONDS.labels(priority).observe(max(0.0, time.time() - timestamp_s))
        if self.buckets is not None and admission.bucket is not None and admission.tenant_id:
            self.buckets.update(admission.tenant_id, admission.bucket)


class ReadinessSensor(faust.Sensor):
    """Marks ``assigned`` unmet while faust rebalances and met once the rebalance (and recovery) ends."""

    def __init__(self, readiness: Readiness, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.readiness = readiness

    def on_rebalance_start(self, app: Any) -> dict[str, Any]:
        """Mark ``assigned`` unmet: the partitions are being handed out again."""
        self.readiness.mark("assigned", False)
        return super().on_rebalance_start(app)

    def on_rebalance_end(self, app: Any, state: dict[str, Any]) -> None:
        """Mark ``assigned`` met: the rebalance and table recovery are over."""
        self.readiness.mark("assigned")


def observe(app: faust.App, readiness: Readiness) -> None:
    """Have ``app`` report its rebalances to ``readiness``."""
    readiness.require("assigned")
    app.sensors.add(ReadinessSensor(readiness))
