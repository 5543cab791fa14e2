"""Everything the pipeline recorded about one request, for `aigc trace`: its Cassandra row and its records on
the request, status, frames, decisions, completions, retry and dead-letter topics.

Reads are bounded by time, never whole topics: the window starts a little before the request was created
(from its row; without one, from its first status event within ``since_ms``) and ends a little after it
finished (or now). Each partition is read from ``offsets_for_times`` of the start up to its end offset at
the time of the read, stopping early once its messages are past the window. A record belongs to the
request when its key or ``request_id`` header names it, or (requests keyed by tenant, retry envelopes)
when the decoded record does.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, KafkaError, TopicPartition

from plumbing.errors import DecodeError
from plumbing.kafka_clients import header_map, make_consumer
from plumbing.metadata import connect, register_types
from plumbing.settings import Settings
from plumbing.topics import PRIORITIES, Stage, Topics
from producers.timeline import FAMILIES, Seen, epoch_ms
from schemas.codec import Codec, default_codec

SLACK_MS = 30_000  # clocks and batching: read this much before created and after finished
POLL_S = 0.5
READ_TIMEOUT_S = 30.0


# -- topic names on this branch and on main (per-class frames and decisions) -------------------------
def topic_families(settings: Settings) -> dict[str, str]:
    """Every topic the timeline reads, with its family (see `producers.timeline.FAMILIES`)."""
    topics = Topics(settings)
    families = {topics.requests(p): "requests" for p in PRIORITIES}
    families |= {name: "frames" for name in topics.all_frames()}
    families |= {name: "decisions" for name in topics.all_decisions()}
    families |= {topics.status: "status", topics.completions: "completions"}
    for stage in Stage:
        families |= {topics.retry(stage, delay): "retry" for delay in settings.retry.delays_s}
        families[topics.dlq(stage)] = "dlq"
    return families


@dataclass(frozen=True)
class RequestRecords:
    request_id: str
    row: dict[str, Any] | None
    seen: list[Seen]
    window: tuple[int, int]  # epoch ms read


def read_request(
    settings: Settings, request_id: str, since_ms: int, now_ms: int | None = None
) -> RequestRecords:
    """The request's row and records. ``since_ms`` bounds the search when Cassandra has no row for it."""
    now = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    row = terminal_row(settings, request_id)
    families = topic_families(settings)
    codec = default_codec()
    group = f"{settings.kafka.topic_prefix}.trace.{uuid.uuid4().hex}"  # assigned, never joined or committed
    consumer = make_consumer(settings, group, "trace", **{"enable.partition.eof": True})
    try:
        existing = consumer.list_topics(timeout=10).topics
        families = {name: family for name, family in families.items() if name in existing}
        if row is not None:
            start = _epoch_ms(row["created_at"]) - SLACK_MS
            end = (_epoch_ms(row["finished_at"]) if row.get("finished_at") else now) + SLACK_MS
            seen = read_window(consumer, codec, request_id, families, start, end)
        else:
            # Where the request's story starts: its first status event since ``since_ms`` (or nothing).
            status = {name: f for name, f in families.items() if f == "status"}
            first = read_window(consumer, codec, request_id, status, since_ms, now)
            start = min((s.timestamp_ms for s in first), default=since_ms) - SLACK_MS
            start, end = max(start, since_ms - SLACK_MS), now + SLACK_MS
            others = {name: f for name, f in families.items() if f != "status"}
            seen = first + read_window(consumer, codec, request_id, others, start, end)
    finally:
        consumer.close()
    return RequestRecords(request_id, row, seen, (start, end))


def terminal_row(settings: Settings, request_id: str) -> dict[str, Any] | None:
    ks = settings.cassandra.keyspace
    cluster, session = connect(settings.cassandra)
    try:
        register_types(cluster, ks)
        row = session.execute(f"SELECT * FROM {ks}.requests WHERE request_id = %s", (request_id,)).one()
    finally:
        cluster.shutdown()
    return None if row is None else row._asdict()


def read_window(
    consumer: Consumer,
    codec: Codec,
    request_id: str,
    families: Mapping[str, str],
    start_ms: int,
    end_ms: int,
    timeout_s: float = READ_TIMEOUT_S,
) -> list[Seen]:
    """Records of ``request_id`` on ``families``' topics with timestamps in [start_ms, end_ms]."""
    if not families:
        return []
    metadata = consumer.list_topics(timeout=10).topics
    wanted = [TopicPartition(t, p, start_ms) for t in families for p in metadata[t].partitions]
    starts = consumer.offsets_for_times(wanted, timeout=10)
    ends: dict[tuple[str, int], int] = {}
    assign = []
    for tp in starts:
        _, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)
        if tp.offset in (OFFSET_END, -1) or tp.offset >= high:
            continue  # nothing at or after the start
        ends[(tp.topic, tp.partition)] = high
        assign.append(tp)
    if not assign:
        return []
    found: list[Seen] = []
    consumer.assign(assign)
    deadline = time.monotonic() + timeout_s
    try:
        while ends and time.monotonic() < deadline:
            for msg in consumer.consume(500, POLL_S):
                topic, partition, offset = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
                key = (topic, partition)
                if key not in ends:
                    continue
                error = msg.error()
                # The end of a partition (after any transaction markers), or past the window: done with it.
                if error is not None and error.code() == KafkaError._PARTITION_EOF:
                    _done(consumer, ends, key)
                    continue
                if error is not None:
                    continue
                _, timestamp = msg.timestamp()
                if offset + 1 >= ends[key] or timestamp > end_ms:
                    _done(consumer, ends, key)
                if timestamp <= end_ms:
                    seen = _belongs(msg, codec, request_id, families[topic])
                    if seen is not None:
                        found.append(seen)
    finally:
        consumer.unassign()
    return found


def _done(consumer: Consumer, ends: dict[tuple[str, int], int], key: tuple[str, int]) -> None:
    del ends[key]
    consumer.incremental_unassign([TopicPartition(*key)])


def _belongs(msg: Any, codec: Codec, request_id: str, family: str) -> Seen | None:
    headers = header_map(msg)
    named = msg.key() == request_id.encode() or headers.get("request_id") == request_id.encode()
    if not named and family not in ("requests", "retry"):
        return None
    try:
        record = codec.decode(msg.value(), FAMILIES[family])
    except DecodeError:
        return None
    if family == "retry":
        inner = {h["key"]: h["value"] for h in record["headers"]}
        named = named or inner.get("request_id") == request_id.encode()
        headers = {k: v for k, v in inner.items() if v is not None}
    elif family == "requests":
        named = named or record.get("request_id") == request_id
    if not named:
        return None
    return Seen(family, msg.topic(), msg.partition(), msg.offset(), msg.timestamp()[1], record, headers)


def _epoch_ms(value: Any) -> int:
    stamp = epoch_ms(value)
    assert stamp is not None
    return stamp
