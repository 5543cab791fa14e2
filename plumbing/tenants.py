"""Per-tenant quotas: written to the compacted ``<prefix>.tenants`` topic, followed by the gatekeeper.

`set_quota` (behind `aigc tenants add`) writes one `TenantQuota` keyed by tenant id. `TenantQuotas` is
a background thread that reads the whole topic from the beginning (no consumer group: every gatekeeper
sees every tenant) and keeps tenant -> `Tier` in memory; `tier_of` answers from memory per request and
falls back to the tenant's tier from the settings for a tenant without quotas of its own. A change
reaches a running gatekeeper within a poll (about a second).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from plumbing.errors import DecodeError
from plumbing.kafka_clients import make_consumer, make_producer, produce_sync
from plumbing.settings import Settings, Tier
from plumbing.topics import Topics
from schemas.codec import Codec, default_codec

log = logging.getLogger(__name__)
POLL_S = 0.2
RETRY_S = 2.0


def quota_record(tenant_id: str, tier: Tier, now_ms: int | None = None) -> dict[str, object]:
    """The `TenantQuota` record of ``tier`` for ``tenant_id``."""
    return {
        "tenant_id": tenant_id,
        "requests_per_s": tier.requests_per_s,
        "request_burst": tier.request_burst,
        "cost_per_s": tier.cost_per_s,
        "cost_burst": tier.cost_burst,
        "updated_at": now_ms if now_ms is not None else time.time_ns() // 1_000_000,
    }


def set_quota(settings: Settings, tenant_id: str, tier: Tier, codec: Codec | None = None) -> None:
    """Write ``tenant_id``'s quotas to the tenants topic and wait for the broker's acknowledgement."""
    codec = codec or default_codec()
    producer = make_producer(settings, "tenants")
    value = codec.encode("TenantQuota", quota_record(tenant_id, tier))
    produce_sync(producer, Topics(settings).tenants, value, key=tenant_id.encode())


def read_quotas(settings: Settings, timeout_s: float = 10.0) -> dict[str, Tier]:
    """Every tenant's quotas as they stand now (reads the topic to its end once)."""
    quotas = TenantQuotas(settings).start(wait_s=timeout_s)
    try:
        return quotas.snapshot()
    finally:
        quotas.stop()


class TenantQuotas:
    """The gatekeeper's view of the tenants topic: tenant -> Tier, kept current by a thread."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._topic = Topics(settings).tenants
        self._tiers: dict[str, Tier] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tenants", daemon=True)

    def start(self, wait_s: float = 10.0) -> TenantQuotas:
        """Start following; return once the topic was read to its end (or ``wait_s`` passed)."""
        self._thread.start()
        self._caught_up.wait(wait_s)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def tier_of(self, tenant_id: str) -> Tier:
        """The tenant's own quotas if it has any, else its tier from the settings."""
        with self._lock:
            tier = self._tiers.get(tenant_id)
        return tier if tier is not None else self._settings.gatekeeper.tier_of(tenant_id)

    def snapshot(self) -> dict[str, Tier]:
        with self._lock:
            return dict(self._tiers)

    def _run(self) -> None:
        """Follow the topic until stopped; a broker outage is waited out, never the end of the thread."""
        while not self._stop.is_set():
            try:
                self._follow()
            except KafkaException as exc:
                log.warning("tenants: %s; reading again in %.0f s", exc, RETRY_S)
                self._stop.wait(RETRY_S)

    def _follow(self) -> None:
        consumer = make_consumer(self._settings, f"tenants-{uuid.uuid4().hex}", "tenants",
                                 **{"enable.partition.eof": True})  # fmt: skip
        codec = default_codec()
        try:
            partitions = consumer.list_topics(self._topic, timeout=10).topics[self._topic].partitions
            consumer.assign([TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in partitions])
            at_eof: set[int] = set()
            while not self._stop.is_set():
                msg = consumer.poll(POLL_S)
                if msg is None:
                    continue
                error = msg.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        at_eof.add(msg.partition() or 0)
                        if len(at_eof) == len(partitions):
                            self._caught_up.set()
                    continue
                self._apply(msg.key(), msg.value(), codec)
        finally:
            self._caught_up.set()
            consumer.close()

    def _apply(self, key: bytes | None, value: bytes | None, codec: Codec) -> None:
        if key is None:
            return
        tenant_id = key.decode("utf-8", "replace")
        if value is None:
            with self._lock:
                self._tiers.pop(tenant_id, None)
            return
        try:
            r = codec.decode(value, "TenantQuota")
            tier = Tier(requests_per_s=r["requests_per_s"], request_burst=r["request_burst"],
                        cost_per_s=r["cost_per_s"], cost_burst=r["cost_burst"])  # fmt: skip
        except (DecodeError, ValueError) as exc:
            log.warning("ignoring unusable quotas for tenant %r: %s", tenant_id, exc)
            return
        with self._lock:
            self._tiers[r["tenant_id"]] = tier
