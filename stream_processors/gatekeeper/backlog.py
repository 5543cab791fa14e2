"""How much render work is waiting per pool and class, for load shedding.

A thread asks the broker once a second, in two batched admin requests, for the log-end offsets of
every render topic and the offsets the pool's renderer group has committed on them; the difference is
the backlog of each (pool, class) in tasks. It also keeps the rate at which each backlog drains, so a
shed request can be told when to come back (`retry_after_ms`).

A class is overloaded when its backlog passes the bound in settings (``gatekeeper.shed_backlog``;
HIGH has none by default). The gatekeeper then rejects new requests of that class with OVERLOADED:
under a burst, low priority degrades first and high priority keeps its latency.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from plumbing.kafka_clients import make_admin
from plumbing.settings import Settings
from plumbing.topics import PRIORITIES, Topics

log = logging.getLogger(__name__)
REFRESH_S = 1.0
DEFAULT_RETRY_AFTER_MS = 5_000
MAX_RETRY_AFTER_MS = 300_000


@dataclass(frozen=True)
class Backlog:
    tasks: int
    drained_per_s: float  # committed tasks per second over the last refresh (0 when unknown)


def retry_after_ms(backlog: Backlog, bound: int) -> int:
    """How long until the backlog should be back under its bound, at the rate it drains now."""
    if backlog.drained_per_s <= 0:
        return DEFAULT_RETRY_AFTER_MS
    excess = max(1, backlog.tasks - bound)
    return min(MAX_RETRY_AFTER_MS, max(1_000, int(1000 * excess / backlog.drained_per_s)))


class BacklogMonitor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings)
        self.bounds = settings.gatekeeper.shed_backlog
        self._backlogs: dict[tuple[str, str], Backlog] = {}
        self._committed: dict[tuple[str, str], tuple[float, int]] = {}  # (time, total committed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="backlog", daemon=True)

    def start(self) -> BacklogMonitor:
        if self.bounds:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def backlog(self, pool: str, priority: str) -> Backlog | None:
        with self._lock:
            return self._backlogs.get((pool, priority))

    def overloaded(self, pool: str, priority: str) -> int | None:
        """retry_after_ms when new ``priority`` work for ``pool`` must be shed now, else None."""
        bound = self.bounds.get(priority)
        backlog = self.backlog(pool, priority)
        if bound is None or backlog is None or backlog.tasks <= bound:
            return None
        return retry_after_ms(backlog, bound)

    def _run(self) -> None:
        admin = make_admin(self.settings)
        while not self._stop.wait(REFRESH_S):
            try:
                self.refresh(admin)
            except KafkaException as exc:  # a broker outage: keep the last figures and ask again later
                log.warning("backlog: %s", exc)

    def refresh(self, admin: AdminClient) -> None:
        partitions: dict[tuple[str, str], list[TopicPartition]] = {}
        for pool in self.settings.pools:
            for priority in PRIORITIES:
                topic = self.topics.render(pool, priority)
                # One topic's metadata at a time: the whole cluster's may be thousands of topics, and
                # decoding it every second cost the gatekeeper a fifth of its Python time under load.
                metadata = admin.list_topics(topic=topic, timeout=10).topics
                if topic in metadata and metadata[topic].error is None:
                    partitions[(pool, priority.value)] = [
                        TopicPartition(topic, p) for p in metadata[topic].partitions
                    ]
        ends = {
            (tp.topic, tp.partition): future.result().offset
            for tp, future in admin.list_offsets(
                {tp: OffsetSpec.latest() for tps in partitions.values() for tp in tps}, request_timeout=10
            ).items()
        }
        committed: dict[tuple[str, int], int] = {}
        for pool in self.settings.pools:
            group = f"{self.settings.kafka.topic_prefix}.renderer.{pool}"
            tps = [tp for (p, _), tps in partitions.items() if p == pool for tp in tps]
            request = [ConsumerGroupTopicPartitions(group, tps)]
            for future in admin.list_consumer_group_offsets(request, request_timeout=10).values():
                for tp in future.result().topic_partitions:
                    committed[(tp.topic, tp.partition)] = max(0, tp.offset)
        now = time.monotonic()
        backlogs = {}
        for key, tps in partitions.items():
            done = sum(committed.get((tp.topic, tp.partition), 0) for tp in tps)
            waiting = sum(
                max(0, ends[(tp.topic, tp.partition)] - committed.get((tp.topic, tp.partition), 0))
                for tp in tps
            )
            before = self._committed.get(key)
            rate = (done - before[1]) / (now - before[0]) if before and now > before[0] else 0.0
            self._committed[key] = (now, done)
            backlogs[key] = Backlog(waiting, max(0.0, rate))
        with self._lock:
            self._backlogs = backlogs
