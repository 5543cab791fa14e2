"""`aigc lag-exporter`: consumer lag of the pipeline's groups, per group, topic, partition and class.

One process per pipeline (the supervisor starts it like a stage). Every ``observability.lag_interval_s``
it asks the broker for the log-end offset of every partition of the pipeline's topics and for what each
group committed there (`plumbing.kafka_clients.OffsetReader`: not the admin call, which aborts the process
when a broker dies under it), and serves the figures on its ``/metrics``:

- ``aigc_consumer_lag_messages{group, topic, partition, priority}``: log-end offset minus the group's
  committed offset (the log-start offset where it committed nothing), for the pipeline's classic groups:
  the gatekeeper (request topics), the assembler (frames, decisions), the relay (retry topics), each
  pool's renderer group (render topics), and any other group whose id starts with ``<prefix>.``;
- ``aigc_share_group_backlog_messages{group, topic, priority}``: for each pool's renderer share group,
  the render tasks no renderer has taken yet. confluent-kafka 2.16 has no admin call for share-group
  offsets (Kafka's DescribeShareGroupOffsets), so this is read where share-mode renderers record how far
  they took each partition: the commits they make under the pool's consumer-group name
  (`gpu_consumers.intake.ShareIntake`). Tasks taken but not yet acknowledged (at most about one batch
  per class per renderer) are not in it.

``priority`` is the class a topic carries (``...high|normal|low``), empty for topics without one. The
group, topic and partition labels are bounded by the pipeline's own topics and groups; at most
`MAX_GROUPS` discovered groups are exported.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import OffsetSpec
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from plumbing.kafka_clients import OffsetReader, renderer_group
from plumbing.observability import Readiness, serve
from plumbing.settings import Settings
from plumbing.shutdown import stop_on_signals
from plumbing.topics import PRIORITIES, Topics

log = logging.getLogger(__name__)
MAX_GROUPS = 50
TIMEOUT_S = 10.0
_CLASS_OF_SUFFIX = {p.suffix: p.value for p in PRIORITIES}


CLASSED_FAMILIES = ("requests", "render", "frames", "decisions")  # topic families with one topic per class


def topic_priority(topic: str) -> str:
    """HIGH, NORMAL or LOW for a topic of one class (``<prefix>.requests.high``, ``...render.<pool>.low``),
    else ""."""
    family = topic.split(".")
    if len(family) >= 3 and family[1] in CLASSED_FAMILIES:
        return _CLASS_OF_SUFFIX.get(family[-1], "")
    return ""


@dataclass(frozen=True)
class Lag:
    """How far one group is behind on one partition: messages between its committed offset and the log end."""

    group: str
    topic: str
    partition: int
    messages: int


@dataclass(frozen=True)
class Snapshot:
    """One reading of the broker: every lag, and every share group's backlog."""

    lags: tuple[Lag, ...] = ()
    backlogs: tuple[tuple[str, str, int], ...] = ()  # (share group, topic, tasks not taken)


class LagExporter(Collector):
    """Reads lags from the broker (`refresh`) and exports the last reading (`collect`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.prefix = settings.kafka.topic_prefix
        self.topics = Topics(settings)
        self.reader = OffsetReader(settings)
        self.snapshot = Snapshot()

    def known_groups(self) -> dict[str, list[str]]:
        """The pipeline's groups and the topics each consumes, read off the topic registry by family."""
        gatekeeper, assembler = self.settings.gatekeeper.app_id, f"{self.prefix}.assembler"
        groups: dict[str, list[str]] = {gatekeeper: [], assembler: [], f"{self.prefix}.relay": []}
        for spec in self.topics.all():
            family = spec.name.removeprefix(f"{self.prefix}.").split(".")
            if family[0] == "requests":
                groups[gatekeeper].append(spec.name)
            elif family[0] == "render" and len(family) > 2:
                groups.setdefault(renderer_group(self.settings, family[1], share=False), []).append(spec.name)
            elif family[0] in ("frames", "decisions"):
                groups[assembler].append(spec.name)
            elif family[0] == "retry":
                groups[f"{self.prefix}.relay"].append(spec.name)
        return groups

    def discovered_groups(self) -> list[str]:
        """Other groups of this pipeline (ids starting with ``<prefix>.``), share groups excluded."""
        listing = self.reader.admin.list_consumer_groups(request_timeout=TIMEOUT_S).result()
        ids = sorted(
            g.group_id
            for g in listing.valid
            if g.group_id.startswith(f"{self.prefix}.") and not g.group_id.endswith(".share")
        )
        return ids[:MAX_GROUPS]

    def refresh(self) -> Snapshot:
        """Read the pipeline's groups' committed offsets and their partitions' start and end offsets from
        the broker; returns (and keeps, for `collect`) the lags and backlogs they give.
        """
        known = self.known_groups()
        everything = self.reader.partitions([spec.name for spec in self.topics.all()], TIMEOUT_S)
        committed: dict[str, dict[tuple[str, int], int]] = {}
        for group in dict.fromkeys([*known, *self.discovered_groups()]):
            # a known group on its own topics; another group of the pipeline wherever it committed
            asked = [tp for tp in everything if tp.topic in known[group]] if group in known else everything
            offsets = self.reader.committed(group, asked, TIMEOUT_S)
            committed[group] = {tp: o for tp, o in offsets.items() if o >= 0 or group in known}
        ends = self.reader.ends(everything, OffsetSpec.latest(), TIMEOUT_S)
        starts = self.reader.ends(everything, OffsetSpec.earliest(), TIMEOUT_S)
        lags = []
        for group, offsets in committed.items():
            expected = {tp for tp in ends if tp[0] in known.get(group, ())}
            for tp in sorted(expected | offsets.keys()):
                if tp not in ends:
                    continue
                position = offsets.get(tp, -1)
                position = position if position >= 0 else starts.get(tp, 0)
                lags.append(Lag(group, tp[0], tp[1], max(0, ends[tp] - position)))
        backlogs = []
        if self.settings.renderer.consumer == "share":
            for pool in self.settings.pools:
                progress = renderer_group(self.settings, pool, share=False)
                for priority in PRIORITIES:
                    topic = self.topics.render(pool, priority)
                    waiting = [lag.messages for lag in lags if lag.group == progress and lag.topic == topic]
                    if waiting:
                        backlogs.append(
                            (renderer_group(self.settings, pool, share=True), topic, sum(waiting))
                        )
        self.snapshot = Snapshot(tuple(lags), tuple(backlogs))
        return self.snapshot

    def collect(self) -> Iterable[GaugeMetricFamily]:
        """The last reading, as the ``aigc_consumer_lag_messages`` and ``aigc_share_group_backlog_messages``
        gauges."""
        snapshot = self.snapshot
        lag = GaugeMetricFamily(
            "aigc_consumer_lag_messages",
            "Log-end offset minus the group's committed offset",
            labels=["group", "topic", "partition", "priority"],
        )
        for row in snapshot.lags:
            lag.add_metric(
                [row.group, row.topic, str(row.partition), topic_priority(row.topic)], row.messages
            )
        yield lag
        backlog = GaugeMetricFamily(
            "aigc_share_group_backlog_messages",
            "Render tasks of a share group that no member has taken yet",
            labels=["group", "topic", "priority"],
        )
        for group, topic, waiting in snapshot.backlogs:
            backlog.add_metric([group, topic, topic_priority(topic)], waiting)
        yield backlog

    def run(self, stop: threading.Event, readiness: Readiness) -> None:
        """Refresh every ``observability.lag_interval_s`` until ``stop`` is set; ``kafka`` is met while the
        broker answers."""
        readiness.require("kafka")
        while not stop.is_set():
            try:
                self.refresh()
                readiness.mark("kafka")
            except KafkaException as exc:  # a broker outage: keep the last reading, say so, try again
                readiness.mark("kafka", False)
                log.warning("lag exporter: %s", exc)
            stop.wait(self.settings.observability.lag_interval_s)


def run(settings: Settings) -> None:
    """Run the lag exporter until SIGINT or SIGTERM."""
    stop = stop_on_signals()
    obs = serve(settings, "lag_exporter", "kafka")
    exporter = LagExporter(settings)
    REGISTRY.register(exporter)
    log.info("lag exporter reading the groups of pipeline %s", settings.kafka.topic_prefix)
    exporter.run(stop, obs.readiness)
