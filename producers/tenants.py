"""`aigc tenants add | ls`: provision a tenant (its reply topic) and set the quotas the gatekeeper applies.

`add` creates ``<prefix>.reply.<tenant>`` (the reply topic the gatekeeper accepts for the tenant; the
broker does not create topics on first use) and the tenants topic if missing, then writes the tenant's
quotas to the compacted ``<prefix>.tenants`` topic, which every running gatekeeper follows. Quotas not
given keep the tenant's current ones (or its tier's from the settings).
"""

from __future__ import annotations

from dataclasses import dataclass

from infra.bootstrap import ensure_topics
from plumbing.kafka_clients import make_admin
from plumbing.settings import Settings, Tier
from plumbing.tenants import read_quotas, set_quota
from plumbing.topics import DAY_MS, Topics, TopicSpec


@dataclass(frozen=True)
class TenantInfo:
    """A tenant as `aigc tenants ls` shows it: its tier (own quotas or the settings'), its reply topics."""

    tenant_id: str
    tier: Tier
    own_quotas: bool  # False: the tier from the settings applies
    reply_topics: list[str]


def reply_topic_spec(settings: Settings, tenant_id: str) -> TopicSpec:
    """The tenant's default reply topic: the name is its reply prefix itself."""
    return TopicSpec(
        Topics(settings).reply_prefix(tenant_id),
        "Completion",
        "request_id",
        settings.kafka.partitions,
        {"retention.ms": str(7 * DAY_MS)},
        f"completions of tenant {tenant_id}'s requests that asked for this reply topic",
    )


def add_tenant(
    settings: Settings,
    tenant_id: str,
    requests_per_s: float | None = None,
    request_burst: float | None = None,
    cost_per_s: float | None = None,
    cost_burst: float | None = None,
) -> tuple[list[str], Tier]:
    """Create the tenant's reply topic and set its quotas; returns the changes made and the quotas."""
    topics = Topics(settings)
    tenants_spec = next(s for s in topics.all() if s.name == topics.tenants)
    changes = ensure_topics(settings, [tenants_spec])
    current = read_quotas(settings).get(tenant_id) or settings.gatekeeper.tier_of(tenant_id)
    given = {
        "requests_per_s": requests_per_s,
        "request_burst": request_burst,
        "cost_per_s": cost_per_s,
        "cost_burst": cost_burst,
    }
    # Validated (rate > 0, burst >= 1) before anything is created.
    tier = Tier.model_validate({**current.model_dump(), **{k: v for k, v in given.items() if v is not None}})
    changes += ensure_topics(settings, [reply_topic_spec(settings, tenant_id)])
    set_quota(settings, tenant_id, tier)
    return changes, tier


def list_tenants(settings: Settings) -> list[TenantInfo]:
    """Tenants with quotas of their own or a reply topic under the default reply prefix."""
    topics = Topics(settings)
    quotas = read_quotas(settings)
    reply_root = f"{topics.prefix}.reply."
    names = set(make_admin(settings).list_topics(timeout=10).topics)
    replies: dict[str, list[str]] = {}
    for name in sorted(names):
        if name.startswith(reply_root):
            replies.setdefault(name[len(reply_root) :].split(".", 1)[0], []).append(name)
    tenants = sorted(set(quotas) | set(replies))
    return [
        TenantInfo(
            t,
            quotas.get(t) or settings.gatekeeper.tier_of(t),
            t in quotas,
            [n for n in sorted(names) if n.startswith(topics.reply_prefix(t))],
        )
        for t in tenants
    ]
