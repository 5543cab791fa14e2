"""Every stage's view of the compacted cancellations topic.

A background thread reads all partitions of ``aigc.cancellations`` from the beginning (no consumer
group, so every process sees every cancellation) and keeps request_id -> tenant_id in memory; a
tombstone forgets one. `is_cancelled` answers from memory, so stages can ask per message, and the
renderer between denoising steps. A cancellation naming the wrong tenant is ignored.
"""

from __future__ import annotations

import logging
import threading
import uuid

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from plumbing.errors import DecodeError
from plumbing.kafka_clients import make_consumer
from plumbing.settings import Settings
from plumbing.topics import Topics
from schemas.codec import Codec, default_codec

log = logging.getLogger(__name__)
POLL_S = 0.2
RETRY_S = 2.0


class CancellationWatcher:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._topic = Topics(settings).cancellations
        self._cancelled: dict[str, tuple[str, str | None]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cancellations", daemon=True)

    def start(self, wait_s: float = 10.0) -> CancellationWatcher:
        self._thread.start()
        self._caught_up.wait(wait_s)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def is_cancelled(self, request_id: str, tenant_id: str | None = None) -> bool:
        with self._lock:
            entry = self._cancelled.get(request_id)
        return entry is not None and (tenant_id is None or entry[0] == tenant_id)

    def reason(self, request_id: str) -> str | None:
        with self._lock:
            entry = self._cancelled.get(request_id)
        return entry[1] if entry else None

    def _run(self) -> None:
        """Follow the topic until stopped; a broker outage is waited out, never the end of the thread."""
        while not self._stop.is_set():
            try:
                self._follow()
            except KafkaException as exc:
                log.warning("cancellations: %s; reading again in %.0f s", exc, RETRY_S)
                self._stop.wait(RETRY_S)

    def _follow(self) -> None:
        consumer = make_consumer(
            self._settings,
            f"cancellations-{uuid.uuid4().hex}",
            "cancellations",
            **{"enable.partition.eof": True},
        )
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
        request_id = key.decode("utf-8", "replace")
        if value is None:
            with self._lock:
                self._cancelled.pop(request_id, None)
            return
        try:
            record = codec.decode(value, "CancelRequest")
        except DecodeError:
            log.warning("ignoring an undecodable cancellation for %s", request_id)
            return
        with self._lock:
            self._cancelled[record["request_id"]] = (record["tenant_id"], record.get("reason"))
