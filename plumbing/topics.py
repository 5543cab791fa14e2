"""The topic registry: every topic name, its schema, key, partitions and retention, spelled in one place.

Bootstrap creates exactly these topics; stages ask this module for names instead of formatting strings.
Names are lowercase and dotted: ``<prefix>.<family>[.<qualifier>...]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

from plumbing.settings import Settings

DAY_MS = 24 * 3600 * 1000
MIB = 1024 * 1024
# The largest message a producer may send, and so the largest request a topic accepts. A request with a
# multi-megabyte prompt must reach the gatekeeper (which rejects it for its length) rather than fail at
# the producer with no answer.
MAX_REQUEST_BYTES = 8 * MIB
# A dead letter or retry envelope carries a whole original message, its key and its headers (twice, as
# fields and as headers): twice the largest request, with room to spare.
MAX_ENVELOPE_BYTES = 20 * MIB


class Priority(StrEnum):
    """The three priority classes; every per-class topic ends with the class's lowercase name."""

    HIGH = "HIGH"
    NORMAL = "NORMAL"
    LOW = "LOW"

    @property
    def suffix(self) -> str:
        """The class as the last part of a topic name: ``high``, ``normal`` or ``low``."""
        return self.value.lower()

    @property
    def rank(self) -> int:
        """0 for the most urgent class."""
        return PRIORITIES.index(self)


PRIORITIES: tuple[Priority, ...] = (Priority.HIGH, Priority.NORMAL, Priority.LOW)


class Stage(StrEnum):
    """Stages that consume, fail and retry; each has a retry chain and a dead-letter topic."""

    GATEKEEPER = "gatekeeper"
    RENDERER = "renderer"
    ASSEMBLER = "assembler"
    WEBHOOKS = "webhooks"


@dataclass(frozen=True)
class TopicSpec:
    """One topic as bootstrap creates it: its name, value schema, key, partitions and configs."""

    name: str
    schema: str  # Avro record name of the value
    key: str  # what the key holds
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    doc: str = ""


def _delay_label(seconds: float) -> str:
    return f"{int(seconds)}s" if seconds == int(seconds) else f"{int(seconds * 1000)}ms"


class Topics:
    """Names of the pipeline's topics for one settings object."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.prefix = settings.kafka.topic_prefix

    def requests(self, priority: Priority | str) -> str:
        """The request topic of ``priority``: ``<prefix>.requests.<class>``."""
        return f"{self.prefix}.requests.{Priority(priority).suffix}"

    def render(self, pool: str, priority: Priority | str) -> str:
        """The render topic of ``pool`` and ``priority``: ``<prefix>.render.<pool>.<class>``."""
        return f"{self.prefix}.render.{pool}.{Priority(priority).suffix}"

    def frames(self, priority: Priority | str) -> str:
        """The rendered-frames topic of ``priority``: ``<prefix>.frames.<class>``."""
        return f"{self.prefix}.frames.{Priority(priority).suffix}"

    def decisions(self, priority: Priority | str) -> str:
        """The gatekeeper's decisions topic of ``priority`` for the sink: ``<prefix>.decisions.<class>``."""
        return f"{self.prefix}.decisions.{Priority(priority).suffix}"

    def all_frames(self) -> list[str]:
        """Every class's frames topic, most urgent first."""
        return [self.frames(p) for p in PRIORITIES]

    def all_decisions(self) -> list[str]:
        """Every class's decisions topic, most urgent first."""
        return [self.decisions(p) for p in PRIORITIES]

    def sink_inputs(self) -> list[str]:
        """What the sink consumes, most urgent class first: each class's decisions and frames."""
        return [topic for p in PRIORITIES for topic in (self.decisions(p), self.frames(p))]

    def class_of(self, topic: str) -> Priority:
        """The priority class of a per-class topic (requests, render, frames, decisions): its last part."""
        return Priority(topic.rsplit(".", 1)[-1].upper())

    @property
    def status(self) -> str:
        """The StatusEvent topic: ``<prefix>.status``."""
        return f"{self.prefix}.status"

    @property
    def completions(self) -> str:
        """The Completion topic: ``<prefix>.completions``."""
        return f"{self.prefix}.completions"

    @property
    def cancellations(self) -> str:
        """The compacted CancelRequest topic: ``<prefix>.cancellations``."""
        return f"{self.prefix}.cancellations"

    def retry(self, stage: Stage | str, delay_s: float) -> str:
        """The retry topic of ``stage`` for a wait of ``delay_s``: ``<prefix>.retry.<stage>.<delay>``
        (``10s``, ``500ms``)."""
        return f"{self.prefix}.retry.{Stage(stage).value}.{_delay_label(delay_s)}"

    def dlq(self, stage: Stage | str) -> str:
        """The dead-letter topic of ``stage``: ``<prefix>.dlq.<stage>``."""
        return f"{self.prefix}.dlq.{Stage(stage).value}"

    def gatekeeper_changelog(self, table: str) -> str:
        """Compacted changelog of one of the gatekeeper's faust tables (faust creates and owns it)."""
        return f"{self.prefix}.gatekeeper.{table}.changelog"

    @property
    def webhook_redeliveries(self) -> str:
        """Completions whose webhook delivery failed, sent back by the retry relay when due (retrying a
        delivery must not publish a Completion on aigc.completions a second time)."""
        return f"{self.prefix}.webhooks.redeliveries"

    @property
    def tenants(self) -> str:
        """The compacted TenantQuota topic: ``<prefix>.tenants``."""
        return f"{self.prefix}.tenants"

    def reply_prefix(self, tenant_id: str) -> str:
        """The prefix a tenant's reply topics must have: from settings, else ``<prefix>.reply.<tenant>``."""
        return self._settings.reply_topic_prefixes.get(tenant_id, f"{self.prefix}.reply.{tenant_id.lower()}")

    def all(self) -> list[TopicSpec]:
        """Every topic the pipeline owns, as bootstrap creates them."""
        k = self._settings.kafka
        specs: list[TopicSpec] = []
        for p in PRIORITIES:
            specs.append(
                TopicSpec(
                    self.requests(p),
                    "GenerationRequest",
                    "tenant_id",
                    k.request_partitions,
                    {"retention.ms": str(7 * DAY_MS), "max.message.bytes": str(MAX_REQUEST_BYTES)},
                    f"{p.value} priority requests from producers",
                )
            )
        for pool in self._settings.pools:
            for p in PRIORITIES:
                specs.append(
                    TopicSpec(
                        self.render(pool, p),
                        "RenderTask",
                        "request_id",
                        k.render_partitions,
                        {"retention.ms": str(DAY_MS)},
                        f"{p.value} priority render tasks for pool {pool}",
                    )
                )
        for p in PRIORITIES:
            specs += [
                TopicSpec(
                    self.frames(p),
                    "FramesRendered",
                    "request_id",
                    k.partitions,
                    {"retention.ms": str(DAY_MS)},
                    f"rendered frame ranges of {p.value} priority requests, for the assembler",
                ),
                TopicSpec(
                    self.decisions(p),
                    "Completion",
                    "request_id",
                    k.partitions,
                    {"retention.ms": str(7 * DAY_MS)},
                    f"terminal decisions made before rendering (rejections) of {p.value} priority requests, "
                    "for the sink to record and publish",
                ),
            ]
        specs += [
            TopicSpec(
                self.status,
                "StatusEvent",
                "request_id",
                k.partitions,
                {"retention.ms": str(DAY_MS)},
                "lifecycle and progress events",
            ),
            TopicSpec(
                self.completions,
                "Completion",
                "request_id",
                k.partitions,
                {"retention.ms": str(7 * DAY_MS)},
                "one terminal result per request",
            ),
            TopicSpec(
                self.cancellations,
                "CancelRequest",
                "request_id",
                k.partitions,
                {
                    "cleanup.policy": "compact,delete",
                    "retention.ms": str(7 * DAY_MS),
                    "min.compaction.lag.ms": "0",
                    "segment.ms": str(3600 * 1000),
                },
                "cancellations, compacted by request_id",
            ),
            TopicSpec(
                self.tenants,
                "TenantQuota",
                "tenant_id",
                1,
                {"cleanup.policy": "compact", "min.compaction.lag.ms": "0", "segment.ms": str(3600 * 1000)},
                "each tenant's quotas (aigc tenants add), compacted by tenant_id, read whole by gatekeepers",
            ),
        ]
        specs.append(
            TopicSpec(
                self.webhook_redeliveries,
                "Completion",
                "request_id",
                k.partitions,
                {"retention.ms": str(7 * DAY_MS)},
                "completions whose webhook POST is tried again (retry relay, `aigc dlq replay`), for the "
                "webhook stage only",
            )
        )
        for stage in Stage:
            for delay in self._settings.retry.delays_s:
                specs.append(
                    TopicSpec(
                        self.retry(stage, delay),
                        "RetryEnvelope",
                        "original key",
                        k.partitions,
                        {"retention.ms": str(DAY_MS), "max.message.bytes": str(MAX_ENVELOPE_BYTES)},
                        f"{stage.value} work waiting {_delay_label(delay)} before its next attempt",
                    )
                )
            specs.append(
                TopicSpec(
                    self.dlq(stage),
                    "DeadLetter",
                    "original key",
                    k.partitions,
                    {"retention.ms": str(30 * DAY_MS), "max.message.bytes": str(MAX_ENVELOPE_BYTES)},
                    f"{stage.value} work that failed for good, for operators to inspect and replay",
                )
            )
        min_isr = k.topic_min_insync_replicas
        if min_isr is not None:  # the 3-broker cluster: an acks=all write needs 2 of the 3 replicas
            specs = [replace(s, config={**s.config, "min.insync.replicas": str(min_isr)}) for s in specs]
        return specs
