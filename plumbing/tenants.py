"""Per-tenant quotas: written to the compacted ``<prefix>.tenants`` topic, followed by the gatekeeper.

`set_quota` (behind `aigc tenants add`) writes one `TenantQuota` keyed by tenant id. `TenantQuotas` is
a background thread that reads the whole topic from the beginning (no consumer group: every gatekeeper
sees every tenant) and keeps tenant -> `Tier` in memory; `tier_of` answers from memory per request and
falls back to the tenant's tier from the settings for a tenant without quotas of its own. A change
reaches a running gatekeeper within a poll (about a second).
"""

from __future__ import annotations

import logging

from plumbing import clock
from plumbing.compacted import CompactedTopicFollower
from plumbing.errors import DecodeError
from plumbing.kafka_clients import make_producer, produce_sync
from plumbing.settings import Settings, Tier
from plumbing.topics import Topics
from schemas.codec import Codec, default_codec
from schemas.records import TenantQuota

log = logging.getLogger(__name__)


def quota_record(tenant_id: str, tier: Tier, now_ms: int | None = None) -> TenantQuota:
    """The `TenantQuota` record of ``tier`` for ``tenant_id``, set at ``now_ms`` (default: now)."""
    return TenantQuota(
        tenant_id=tenant_id,
        requests_per_s=tier.requests_per_s,
        request_burst=tier.request_burst,
        cost_per_s=tier.cost_per_s,
        cost_burst=tier.cost_burst,
        updated_at=now_ms if now_ms is not None else clock.now_ms(),
    )


def set_quota(settings: Settings, tenant_id: str, tier: Tier, codec: Codec | None = None) -> None:
    """Write ``tenant_id``'s quotas to the tenants topic and wait for the broker's acknowledgement."""
    codec = codec or default_codec()
    producer = make_producer(settings, "tenants")
    value = codec.write(quota_record(tenant_id, tier))
    produce_sync(producer, Topics(settings).tenants, value, key=tenant_id.encode())


def read_quotas(settings: Settings, timeout_s: float = 10.0) -> dict[str, Tier]:
    """Every tenant's quotas as they stand now (reads the topic to its end once)."""
    quotas = TenantQuotas(settings).start(wait_s=timeout_s)
    try:
        return quotas.snapshot()
    finally:
        quotas.stop()


class TenantQuotas(CompactedTopicFollower):
    """The gatekeeper's view of the tenants topic: tenant -> Tier, kept current by a thread."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, Topics(settings).tenants, "tenants")
        self._tiers: dict[str, Tier] = {}

    def tier_of(self, tenant_id: str) -> Tier:
        """The tenant's own quotas if it has any, else its tier from the settings."""
        with self._lock:
            tier = self._tiers.get(tenant_id)
        return tier if tier is not None else self._settings.gatekeeper.tier_of(tenant_id)

    def snapshot(self) -> dict[str, Tier]:
        """Every tenant with quotas of its own, and those quotas, as they stand now."""
        with self._lock:
            return dict(self._tiers)

    def _apply(self, key: bytes | None, value: bytes | None, codec: Codec) -> None:
        if key is None:
            return
        tenant_id = key.decode("utf-8", "replace")
        if value is None:
            with self._lock:
                self._tiers.pop(tenant_id, None)
            return
        try:
            quota = codec.read(value, TenantQuota)
            tier = Tier(requests_per_s=quota.requests_per_s, request_burst=quota.request_burst,
                        cost_per_s=quota.cost_per_s, cost_burst=quota.cost_burst)  # fmt: skip
        except (DecodeError, ValueError) as exc:
            log.warning("ignoring unusable quotas for tenant %r: %s", tenant_id, exc)
            return
        with self._lock:
            self._tiers[quota.tenant_id] = tier
