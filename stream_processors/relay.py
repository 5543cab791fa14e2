"""The retry relay: RetryEnvelopes in, the original messages back on their topics when due.

Consumes every ``aigc.retry.<stage>.<delay>`` topic (consumer group ``<prefix>.relay``). Each topic holds
one delay, so within a partition the envelopes come due in the order they arrive: the relay sends what
is due and, at the first envelope that is not, pauses that partition and seeks back to it until its
``due_at``. Other partitions, and the relay's other work, carry on meanwhile; nothing sleeps.

The original key, value and headers go back to the original topic unchanged, plus ``aigc.attempts`` and
``aigc.first_failed_at`` so the stage knows how many attempts were made. An envelope that cannot be
decoded is dead-lettered to the stage its topic names.

Delivery: offsets are committed after the broker acknowledged every message sent for them (one flush
per batch), so a crash sends some messages twice and loses none; stages are idempotent.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from confluent_kafka import Message, TopicPartition

from plumbing import metrics, tracing
from plumbing.clock import now_ms
from plumbing.dead_letters import Failure, Original, dead_letter
from plumbing.errors import DecodeError
from plumbing.headers import ATTEMPTS, FIRST_FAILED_AT, ORIGIN, Headers
from plumbing.kafka_clients import consume_available, make_consumer, make_producer
from plumbing.observability import Readiness, serve
from plumbing.settings import Settings
from plumbing.shutdown import stop_on_signals
from plumbing.topics import Stage, Topics
from schemas.codec import default_codec
from schemas.records import RetryEnvelope

log = logging.getLogger(__name__)
BATCH = 200
POLL_S = 0.1


class Relay:
    """The retry relay's consumer loop: due envelopes sent back, the others held on paused partitions."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings)
        self.codec = default_codec()
        self.stage_of = {
            self.topics.retry(stage, delay): stage for stage in Stage for delay in settings.retry.delays_s
        }
        self.consumer = make_consumer(settings, f"{settings.kafka.topic_prefix}.relay", "relay")
        self.producer = make_producer(settings, "relay")
        self.waiting: dict[tuple[str, int], int] = {}  # paused partition -> due_at of its head
        self.sent = 0
        self.failed = 0  # deliveries of the current batch that failed
        self.readiness = Readiness()  # `run` gives it the process's (served on /readyz)

    def run(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set, then flush the producer and leave the group."""
        self.readiness.require("assigned")
        self.consumer.subscribe(
            list(self.stage_of),
            on_assign=lambda *_: self.readiness.mark("assigned"),
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        log.info("relay consuming %d retry topics", len(self.stage_of))
        try:
            while not stop.is_set():
                self._resume_due()
                batch = [m for m in consume_available(self.consumer, BATCH, POLL_S) if not m.error()]
                if batch:
                    self._relay(batch)
        finally:
            self.producer.flush(30)
            self.consumer.close()

    def _relay(self, batch: list[Message]) -> None:
        commit: dict[tuple[str, int], int] = {}
        first: dict[tuple[str, int], int] = {}
        self.failed = 0
        held: set[tuple[str, int]] = set()
        now = now_ms()
        for msg in batch:
            original = Original.of(msg)
            tp = (original.topic, original.partition)
            first.setdefault(tp, original.offset)
            if tp in held:
                continue  # behind an envelope that is not due: fetched again after the resume
            try:
                envelope = self.codec.read(msg.value(), RetryEnvelope)
            except DecodeError as exc:
                stage = self.stage_of[original.topic]
                dlq = self.topics.dlq(stage)
                value, headers = dead_letter(
                    self.codec, original, Failure.of(stage, exc, 1, now, now), topic=dlq
                )
                self.producer.produce(dlq, value, original.key, headers=headers, on_delivery=self._delivered)
                commit[tp] = original.offset + 1
                continue
            if envelope.due_at > now:
                held.add(tp)
                self.waiting[tp] = envelope.due_at
                partition = TopicPartition(original.topic, original.partition, original.offset)
                self.consumer.pause([partition])
                self.consumer.seek(partition)
                continue
            self._send(envelope)
            commit[tp] = original.offset + 1
        if commit:
            # Commit only what the broker acknowledged; through an outage, keep waiting (librdkafka retries).
            while self.producer.flush(30):
                log.warning("relayed messages not acknowledged yet; waiting for the broker")
            if self.failed:
                log.warning("%d relayed message(s) failed; this batch is read again", self.failed)
                for (topic, number), offset in first.items():
                    self.consumer.seek(TopicPartition(topic, number, offset))
                return
            offsets = [TopicPartition(t, p, o) for (t, p), o in commit.items()]
            self.consumer.commit(offsets=offsets, asynchronous=False)

    def _send(self, envelope: RetryEnvelope) -> None:
        """Produce the envelope's original message back to its topic, with the attempt headers."""
        kept = [(h.key, h.value) for h in envelope.headers if h.key not in (ATTEMPTS, FIRST_FAILED_AT)]
        first = f"{envelope.original_topic}:{envelope.original_partition}:{envelope.original_offset}"
        origin = next((v for k, v in kept if k == ORIGIN and v), first.encode())
        headers: Headers = [(k, v) for k, v in kept if k != ORIGIN]
        headers += [
            (ATTEMPTS, str(envelope.attempts).encode()),
            (FIRST_FAILED_AT, str(envelope.first_failed_at).encode()),
            (ORIGIN, origin),
        ]
        headers = tracing.relayed(headers, attempt=envelope.attempts, error_code=envelope.error_code)
        while True:
            try:
                self.producer.produce(
                    envelope.original_topic,
                    envelope.value,
                    envelope.key,
                    headers=headers,
                    on_delivery=self._delivered,
                )
                break
            except BufferError:
                self.producer.poll(0.05)
        self.sent += 1
        metrics.routed("relay", envelope.original_topic, envelope.error_code)

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.failed += 1

    def _resume_due(self) -> None:
        now = now_ms()
        due = [tp for tp, at in self.waiting.items() if at <= now]
        if due:
            self.consumer.resume([TopicPartition(t, p) for t, p in due])
            for tp in due:
                del self.waiting[tp]

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        """Forget the held partitions that go, and resume them: librdkafka keeps a partition paused
        across its revocation, so one assigned back later would otherwise stay paused for good. When it
        comes back, its held envelope is fetched again from the committed offset (and held again)."""
        for tp in partitions:
            self.waiting.pop((tp.topic, tp.partition), None)
        consumer.resume(partitions)


def run(settings: Settings) -> None:
    """Run the relay until SIGINT or SIGTERM."""
    stop = stop_on_signals()
    obs = serve(settings, "relay", "assigned")
    relay = Relay(settings)
    relay.readiness = obs.readiness
    relay.run(stop)
