"""A process's in-memory view of a compacted topic, kept current by a background thread.

The thread reads every partition from the beginning without a consumer group, so every process sees
every record; a subclass's `_apply` folds each record (or tombstone) into its own state. `start` returns
once the topic has been read to its end (or its wait passed), and a broker outage is waited out: the
thread reads the topic again from the beginning, never ends on its own.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Self

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from plumbing.kafka_clients import make_consumer
from plumbing.settings import Settings
from schemas.codec import Codec, default_codec

log = logging.getLogger(__name__)
POLL_S = 0.2
RETRY_S = 2.0


class CompactedTopicFollower:
    """Follows ``topic`` in a thread named ``name``; subclasses implement `_apply` under `_lock`."""

    def __init__(self, settings: Settings, topic: str, name: str) -> None:
        self._settings = settings
        self._topic = topic
        self._name = name
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self, wait_s: float = 10.0) -> Self:
        """Start following; return once the topic was read to its end (or ``wait_s`` passed)."""
        self._thread.start()
        self._caught_up.wait(wait_s)
        return self

    def stop(self) -> None:
        """Stop following (waits up to 5 s for the thread)."""
        self._stop.set()
        self._thread.join(5)

    def _apply(self, key: bytes | None, value: bytes | None, codec: Codec) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow()
            except KafkaException as exc:
                log.warning("%s: %s; reading again in %.0f s", self._name, exc, RETRY_S)
                self._stop.wait(RETRY_S)

    def _follow(self) -> None:
        consumer = make_consumer(self._settings, f"{self._name}-{uuid.uuid4().hex}", self._name,
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
