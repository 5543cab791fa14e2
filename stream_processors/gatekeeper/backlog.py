"""How much render work is waiting per pool and class, for load shedding.

A thread asks the broker once a second, in two batched admin requests per pool (`group_offsets`),
for the log-end offsets of its render topics and the offsets its renderer group has committed on them;
the difference is the backlog of each (pool, class) in tasks. It also keeps the rate at which each
backlog drains, so a shed request can be told when to come back (`retry_after_ms`).

A class is overloaded when its backlog passes the bound in settings (``gatekeeper.shed_backlog``;
HIGH has none by default). The gatekeeper then rejects new requests of that class with OVERLOADED:
under a burst, low priority degrades first and high priority keeps its latency.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from confluent_kafka import KafkaException

from plumbing.kafka_clients import OffsetReader
from plumbing.settings import Settings
from plumbing.topics import PRIORITIES, Topics

log = logging.getLogger(__name__)
REFRESH_S = 1.0
DEFAULT_RETRY_AFTER_MS = 5_000
MAX_RETRY_AFTER_MS = 300_000


@dataclass(frozen=True)
class Backlog:
    """The render work waiting in one pool and class, and how fast it drains."""

    tasks: int
    drained_per_s: float  # committed tasks per second over the last refresh (0 when unknown)


def retry_after_ms(backlog: Backlog, bound: int) -> int:
    """How long until the backlog should be back under its bound, at the rate it drains now."""
    if backlog.drained_per_s <= 0:
        return DEFAULT_RETRY_AFTER_MS
    excess = max(1, backlog.tasks - bound)
    return min(MAX_RETRY_AFTER_MS, max(1_000, int(1000 * excess / backlog.drained_per_s)))


class BacklogMonitor:
    """The backlog of every pool and class, refreshed by a thread every `REFRESH_S` (thread-safe reads)."""

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
        """Start refreshing (only when some class has a bound); returns self."""
        if self.bounds:
            self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the thread to stop; it does within a refresh."""
        self._stop.set()

    def backlog(self, pool: str, priority: str) -> Backlog | None:
        """The last figures of ``pool`` and ``priority``; None until a refresh has seen its topic."""
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
        reader = OffsetReader(self.settings)
        while not self._stop.wait(REFRESH_S):
            try:
                self.refresh(reader)
            except KafkaException as exc:  # a broker outage: keep the last figures and ask again later
                log.warning("backlog: %s", exc)

    def refresh(self, reader: OffsetReader) -> None:
        """Ask the broker for every pool's render offsets and replace the figures with what it answers."""
        now = time.monotonic()
        backlogs = {}
        for pool in self.settings.pools:
            topics = {priority.value: self.topics.render(pool, priority) for priority in PRIORITIES}
            group = f"{self.settings.kafka.topic_prefix}.renderer.{pool}"
            offsets = reader.group_offsets(group, list(topics.values()))
            for priority, topic in topics.items():
                partitions = [both for (t, _), both in offsets.items() if t == topic]
                if not partitions:
                    continue  # the topic does not exist (yet)
                done = sum(committed for committed, _ in partitions)
                waiting = sum(max(0, end - committed) for committed, end in partitions)
                key = (pool, priority)
                before = self._committed.get(key)
                rate = (done - before[1]) / (now - before[0]) if before and now > before[0] else 0.0
                self._committed[key] = (now, done)
                backlogs[key] = Backlog(waiting, max(0.0, rate))
        with self._lock:
            self._backlogs = backlogs
