"""Factories for confluent-kafka clients with the pipeline's defaults.

Producers are idempotent with ``acks=all``: a retried send cannot duplicate or reorder a partition's
messages. Consumers never auto-commit: each stage commits after its outputs are acknowledged, and
says so where it commits. Consumers read committed data only, so aborted transactions never show.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    ShareConsumer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec

from plumbing.errors import DeliveryError, is_fatal
from plumbing.headers import Headers
from plumbing.settings import Settings
from plumbing.topics import MAX_ENVELOPE_BYTES

# librdkafka's own log lines go through Python logging (stage logs, pytest capture) instead of raw stderr.
LIBRDKAFKA_LOGGER = logging.getLogger("librdkafka")
log = logging.getLogger(__name__)


def client_id(settings: Settings, role: str) -> str:
    """The Kafka ``client.id`` of a client of ``role``: settings' client id, role, host and pid."""
    return f"{settings.kafka.client_id}.{role}.{socket.gethostname()}.{os.getpid()}"


def _common(settings: Settings, role: str) -> dict[str, Any]:
    """The librdkafka settings every client of ``role`` starts from: connection, client id, logging, and
    the ledger's statistics when ``call_counts_dir`` is set."""
    conf: dict[str, Any] = {
        **settings.kafka.client_config(),
        "client.id": client_id(settings, role),
        "logger": LIBRDKAFKA_LOGGER,
    }
    if settings.call_counts_dir is not None:
        from plumbing.call_counts import CallCounts

        conf.update(CallCounts.of(settings.call_counts_dir).kafka_config())
    return conf


def make_producer(settings: Settings, role: str, **overrides: Any) -> Producer:
    """An idempotent producer (acks=all, lz4, the Java clients' partitioner) for ``role``; ``overrides`` are
    librdkafka settings on top.
    """
    conf: dict[str, Any] = {
        **_common(settings, role),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 2,
        "compression.type": "lz4",
        # Java clients' partitioner, so keys land on the same partitions whoever produces them.
        "partitioner": "murmur2_random",
        "message.max.bytes": MAX_ENVELOPE_BYTES,
    }
    conf.update(overrides)
    return Producer(conf)


# session.timeout.ms of the consumer groups (the sinks', the gatekeeper's, classic renderers'). It must
# outlast a group coordinator's failover, or every member of the group ends its session and rejoins, a
# rebalance on top of the outage, and a static member may come back fenced (a fatal error: the stage
# restarts). On the 3-broker test cluster a SIGKILLed coordinator's successor answered 6 to 12 s after
# the kill (fencing, metadata, loading __consumer_offsets; 2 cores shared with the whole pipeline), past
# the 10 s we had. Kafka's default is 45 s. A process that dies for good holds its partitions this long;
# one restarted by its supervisor rejoins at once under its static group.instance.id.
CONSUMER_SESSION_MS = 30_000


def make_consumer(settings: Settings, group_id: str, role: str, **overrides: Any) -> Consumer:
    """A consumer in ``group_id`` that commits only what it is told to and reads committed transactions only
    (cooperative-sticky, static membership when the settings name an instance); ``overrides`` on top.
    """
    conf: dict[str, Any] = {
        **_common(settings, role),
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "partition.assignment.strategy": "cooperative-sticky",
        # A member that vanished without leaving (kill -9) gives its partitions back after this long; no
        # longer than a shorter max.poll.interval.ms of the overrides (librdkafka refuses that).
        "session.timeout.ms": min(
            CONSUMER_SESSION_MS, overrides.get("max.poll.interval.ms", CONSUMER_SESSION_MS)
        ),
        "heartbeat.interval.ms": 2_000,
    }
    if settings.instance:
        # Static membership: a restarted process with the same id resumes its assignment at once.
        conf["group.instance.id"] = f"{group_id}.{settings.instance}"
    conf.update(overrides)
    return Consumer(conf)


def renderer_group(settings: Settings, pool: str, share: bool | None = None) -> str:
    """The group of ``pool``'s renderers: a share group in share mode, a consumer group in classic mode
    (``share`` picks one, else ``renderer.consumer`` does).

    The names differ so that a broker can hold both (a group id has one type for its whole life). The
    consumer group's committed offsets are what backlog readers (the gatekeeper's shedding, lag tools)
    read in both modes: share-mode renderers commit there how far the queue has been taken."""
    base = f"{settings.kafka.topic_prefix}.renderer.{pool}"
    share = settings.renderer.consumer == "share" if share is None else share
    return f"{base}.share" if share else base


def make_share_consumer(settings: Settings, group_id: str, role: str, **overrides: Any) -> ShareConsumer:
    """A share-group member (KIP-932) that acknowledges each record explicitly.

    Records it polls are locked to it until acknowledged (ACCEPT, RELEASE or REJECT) or until the group's
    ``share.record.lock.duration.ms`` passes; it may poll again only once every record of the previous
    poll is acknowledged. Share groups read committed data only on their own setting
    (``share.isolation.level``, a group config), not on a client property."""
    conf: dict[str, Any] = {
        **_common(settings, role),
        "group.id": group_id,
        "share.acknowledgement.mode": "explicit",
    }
    conf.update(overrides)
    return ShareConsumer(conf)


def consume_available(consumer: Consumer, max_messages: int, timeout_s: float) -> list[Message]:
    """Up to ``max_messages`` messages, returning as soon as one has arrived.

    ``Consumer.consume(n, timeout)`` waits for ``n`` messages or the whole timeout, so at low load every
    lone message would sit out the timeout. This blocks only for the first message, then takes whatever
    else is already fetched: batches under load, no added latency when idle.
    """
    first = consumer.poll(timeout_s)
    if first is None:
        return []
    messages = [first, *consumer.consume(max_messages - 1, 0)] if max_messages > 1 else [first]
    for msg in messages:
        error = msg.error()
        if error is not None and is_fatal(error):
            # A fenced static member (its session lost in a broker outage) or a failed client: its
            # stage must restart, or it would go on polling a consumer that never delivers again.
            raise KafkaException(error)
    return messages


# For clients that ask about partitions and groups rather than produce or consume (admin clients, offset
# readers): a connection to every broker. With sparse connections on (librdkafka's default), a broker that
# is down waits in state INIT, and each lookup of it (an admin request for a partition it still leads)
# schedules a connection that cancels the reconnect backoff; the refused connection wakes the request,
# which schedules the next one. In `aigc chaos` on 3 brokers each backlog reader's clients spun so in
# connect() for the whole outage (20-35% of a core a client, system CPU 60%), stalling the machine. Without
# sparse connections a down broker is retried by its own thread with the exponential reconnect backoff.
# Producers and consumers keep the default: with every client dense, both sinks of a chaos run blocked in
# send_offsets_to_transaction when the group's coordinator was killed (librdkafka #5511: a transactional
# producer waiting for a dead coordinator is woken only by broker connections going up or down, which
# sparse connections bring more often).
DENSE = {"enable.sparse.connections": False}


def make_admin(settings: Settings) -> AdminClient:
    """An admin client of the settings' cluster (connected to every broker, see `DENSE`)."""
    return AdminClient({**_common(settings, "admin"), **DENSE})


class OffsetReader:
    """Committed offsets of consumer groups and the log ends of their partitions, for backlog readers (the
    gatekeeper's shedding and stall guard, the lag exporter).

    Committed offsets are read by a consumer that carries the group's id and never subscribes (so it
    never joins the group): librdkafka 2.16's admin ``ListConsumerGroupOffsets`` aborts the process
    (``rd_kafka_enq_once_del_source_return: Assertion `eonce->refcnt > 0'``, librdkafka #4605 and #3663)
    when a broker is killed while it is in flight, which `aigc chaos` showed on the 3-broker cluster in
    every stage that called it; the consumer's offset fetch survives the same kills. Log ends and
    metadata come from the admin client. One reader per thread (the clients are kept between calls)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.admin = make_admin(settings)
        self._consumers: dict[str, Consumer] = {}

    def partitions(self, topics: list[str], timeout_s: float = 10.0) -> list[TopicPartition]:
        """Every partition of those ``topics`` that exist: one metadata request per topic (a whole
        cluster's metadata may be thousands of topics, and decoding it every second cost the gatekeeper a
        fifth of its Python time under load)."""
        partitions = []
        for topic in topics:
            metadata = self.admin.list_topics(topic=topic, timeout=timeout_s).topics
            if topic in metadata and metadata[topic].error is None:
                partitions += [TopicPartition(topic, p) for p in metadata[topic].partitions]
        return partitions

    def ends(
        self, partitions: list[TopicPartition], spec: OffsetSpec | None = None, timeout_s: float = 10.0
    ) -> dict[tuple[str, int], int]:
        """The log-end offsets (or ``spec``'s, e.g. the earliest) of ``partitions``; a partition whose
        answer is an error (a topic deleted meanwhile) is left out."""
        if not partitions:
            return {}
        spec = spec or OffsetSpec.latest()
        out = {}
        for tp, future in self.admin.list_offsets(
            {tp: spec for tp in partitions}, request_timeout=timeout_s
        ).items():
            try:
                out[(tp.topic, tp.partition)] = future.result().offset
            except KafkaException as exc:
                log.debug("offsets of %s[%d]: %s", tp.topic, tp.partition, exc)
        return out

    def committed(
        self, group: str, partitions: list[TopicPartition], timeout_s: float = 10.0
    ) -> dict[tuple[str, int], int]:
        """What ``group`` committed on ``partitions``: -1 where it committed nothing. Raises
        KafkaException when the group's coordinator does not answer in time."""
        if not partitions:
            return {}
        consumer = self._consumers.get(group)
        if consumer is None:
            consumer = self._consumers[group] = Consumer(
                {
                    **_common(self.settings, "offsets"),
                    **DENSE,
                    "group.id": group,
                    "enable.auto.commit": False,
                }
            )
        return {
            (tp.topic, tp.partition): tp.offset if tp.offset >= 0 and tp.error is None else -1
            for tp in consumer.committed(partitions, timeout=timeout_s)
        }

    def group_offsets(
        self, group: str, topics: list[str], timeout_s: float = 10.0
    ) -> dict[tuple[str, int], tuple[int, int]]:
        """Per partition of those ``topics`` that exist: (what ``group`` committed there, 0 if nothing; its
        log-end offset)."""
        partitions = self.partitions(topics, timeout_s)
        ends = self.ends(partitions, timeout_s=timeout_s)
        committed = self.committed(group, partitions, timeout_s)
        return {key: (max(0, committed.get(key, 0)), end) for key, end in ends.items()}


def header_list(message: Message) -> list[tuple[str, bytes | None]]:
    """Headers of a consumed message, in order, values as bytes."""
    raw = message.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return [(k, v.encode() if isinstance(v, str) else v) for k, v in pairs]


def header_map(message: Message) -> dict[str, bytes]:
    """Headers of a consumed message as a dict of bytes (last value wins)."""
    return {k: v for k, v in header_list(message) if v is not None}


def produce_sync(
    producer: Producer,
    topic: str,
    value: bytes | None,
    key: bytes | str | None = None,
    headers: Headers | None = None,
    timeout_s: float = 30.0,
    partition: int = -1,
) -> Message:
    """Produce one message and wait for the broker's acknowledgement; raises DeliveryError."""
    result: list[tuple[KafkaError | None, Message]] = []
    producer.produce(
        topic,
        value=value,
        key=key,
        headers=headers,
        partition=partition,
        on_delivery=lambda err, msg: result.append((err, msg)),
    )
    remaining = producer.flush(timeout_s)
    if not result:
        raise DeliveryError(f"{topic}: no acknowledgement in {timeout_s} s ({remaining} messages pending)")
    err, msg = result[0]
    if err is not None:
        raise DeliveryError(f"{topic}: {err.str()}", code=f"KAFKA_{err.name()}")
    return msg


T = TypeVar("T")
# Errors one-shot requests (offsets_for_times, watermarks) report while a leader is being elected or
# moved; librdkafka does not flag them retriable there.
_TRANSIENT = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._TRANSPORT,
        KafkaError._TIMED_OUT,
        KafkaError.REQUEST_TIMED_OUT,
    }
)


def retry_transient(call: Callable[[], T], timeout_s: float = 15.0) -> T:
    """``call()``, again while it fails with a retriable Kafka error (a new topic's leader not yet
    known to the broker, a leader moving): librdkafka retries these for produce and fetch itself, but
    not for one-shot requests such as offsets_for_times."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except KafkaException as exc:
            error = exc.args[0]
            if not (error.retriable() or error.code() in _TRANSIENT) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def watermarks(consumer: Any, tp: TopicPartition, timeout_s: float = 10.0) -> tuple[int, int]:
    """A partition's (low, high) watermarks, asked of the broker now (not the cached ones), again while
    the broker answers with a transient error such as a topic created a moment earlier not led yet."""
    low, high = retry_transient(
        lambda: consumer.get_watermark_offsets(tp, timeout=timeout_s, cached=False), timeout_s
    )
    return int(low), int(high)


def start_positions(
    consumer: Any, since: list[TopicPartition], timeout_s: float = 10.0
) -> list[TopicPartition]:
    """Where to start reading each partition of ``since`` (each offset a time, epoch ms): its first record
    at or after that time, else its end as it is now, read before the time query as a concrete offset: a
    logical OFFSET_END would be resolved only when fetching starts, and would skip a record written in
    between (a wait that misses its own completion). Transient errors are asked again (`retry_transient`).
    """
    ends = {(tp.topic, tp.partition): watermarks(consumer, tp, timeout_s)[1] for tp in since}
    resolved = retry_transient(lambda: consumer.offsets_for_times(since, timeout=timeout_s))
    return [
        tp if tp.offset >= 0 else TopicPartition(tp.topic, tp.partition, ends[(tp.topic, tp.partition)])
        for tp in resolved
    ]
