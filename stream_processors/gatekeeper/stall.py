"""A guard against a request partition the gatekeeper stopped reading: the process exits and restarts.

faust can leave a partition unread after a restart that overlaps a broker restart (aigc chaos caught
one: the last request of a partition stayed uncommitted for five minutes while the worker looked idle
and healthy), and with `faust_fixes` a record faust failed to hand to the agent stops the partition's
commits instead of being committed over. A thread asks the broker every few seconds for the log-end
offset of each request partition and the offset the gatekeeper group committed there. A partition whose
committed offset trails its end and has not moved for ``gatekeeper.stall_timeout_s`` is stuck: the guard
logs it and ends the process, and the restarted worker reads the partition from its committed offset
(nothing is lost; `Gate.admit` makes a repeat harmless). With several gatekeepers each may restart for a
stuck partition of another; the restarts are cheap and the partition gets read.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from confluent_kafka import KafkaException

from plumbing.kafka_clients import OffsetReader
from plumbing.settings import Settings
from plumbing.topics import PRIORITIES, Topics

log = logging.getLogger(__name__)
CHECK_EVERY_S = 5.0
EXIT_STATUS = 75


class Progress:
    """Per partition, since when its committed offset has trailed its end without moving."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._since: dict[tuple[str, int], tuple[int, float]] = {}  # -> (committed, stuck since)

    def stuck(self, offsets: dict[tuple[str, int], tuple[int, int]], now: float) -> list[str]:
        """``offsets``: partition -> (committed, end). The partitions stuck for longer than the timeout."""
        stuck = []
        for (topic, partition), (committed, end) in offsets.items():
            key = (topic, partition)
            if committed >= end:
                self._since.pop(key, None)
                continue
            before = self._since.get(key)
            if before is None or before[0] != committed:
                self._since[key] = (committed, now)
            elif now - before[1] > self.timeout_s:
                stuck.append(f"{topic}[{partition}] at {committed} of {end}")
        return stuck


class StallGuard:
    """The thread that watches the gatekeeper group's request partitions and exits the process on a stall."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = [Topics(settings).requests(p) for p in PRIORITIES]
        self.progress = Progress(settings.gatekeeper.stall_timeout_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-guard", daemon=True)

    def start(self) -> StallGuard:
        """Start watching; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the thread to stop; it does within a check."""
        self._stop.set()

    def _run(self) -> None:
        reader = OffsetReader(self.settings)
        while not self._stop.wait(CHECK_EVERY_S):
            try:
                offsets = reader.group_offsets(self.settings.gatekeeper.app_id, self.topics)
            except KafkaException as exc:  # a broker outage: the clock of each partition keeps running
                log.warning("stall guard: %s", exc)
                continue
            stuck = self.progress.stuck(offsets, time.monotonic())
            if stuck:
                log.critical(
                    "no progress for %.0f s on %s; exiting so a restarted worker reads them again",
                    self.progress.timeout_s,
                    ", ".join(stuck),
                )
                logging.shutdown()
                os._exit(EXIT_STATUS)
