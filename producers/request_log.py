"""Everything the pipeline recorded about one request, for `aigc trace`: its Cassandra row and its records on
the request, status, frames, decisions, completions, retry and dead-letter topics.

Reads are bounded by time, never whole topics: the window starts a little before the request was created
(from its row; without one, from its first status event within ``since_ms``) and ends a little after it
finished (or now). Each partition is read (`producers.checker.BoundedRead`) from ``offsets_for_times`` of
the start up to its end offset at the time of the read, stopping early once its messages are past the
window. A record belongs to the request when its key or ``request_id`` header names it, or (requests keyed
by tenant, retry envelopes) when the decoded record does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from plumbing.clock import now_ms as clock_now_ms
from plumbing.errors import DecodeError
from plumbing.kafka_clients import header_map
from plumbing.metadata import connect, register_types
from plumbing.settings import Settings
from plumbing.topics import PRIORITIES, Stage, Topics
from producers.checker import BoundedRead
from producers.timeline import FAMILIES, Seen, epoch_ms
from schemas.codec import Codec, default_codec
from schemas.records import GenerationRequest, RetryEnvelope

SLACK_MS = 30_000  # clocks and batching: read this much before created and after finished
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
    """What `read_request` found: the request's terminal row (as a dict; None before it finished), its
    records, and the window of epoch ms that was read."""

    request_id: str
    row: dict[str, Any] | None
    seen: list[Seen]
    window: tuple[int, int]  # epoch ms read


def read_request(
    settings: Settings, request_id: str, since_ms: int, now_ms: int | None = None
) -> RequestRecords:
    """The request's row and records. ``since_ms`` bounds the search when Cassandra has no row for it."""
    now = now_ms if now_ms is not None else clock_now_ms()
    row = terminal_row(settings, request_id)
    families = topic_families(settings)
    codec = default_codec()
    if row is not None:
        start = _epoch_ms(row["created_at"]) - SLACK_MS
        end = (_epoch_ms(row["finished_at"]) if row.get("finished_at") else now) + SLACK_MS
        seen = read_window(settings, codec, request_id, families, start, end)
    else:
        # Where the request's story starts: its first status event since ``since_ms`` (or nothing).
        status = {name: f for name, f in families.items() if f == "status"}
        first = read_window(settings, codec, request_id, status, since_ms, now)
        start = min((s.timestamp_ms for s in first), default=since_ms) - SLACK_MS
        start, end = max(start, since_ms - SLACK_MS), now + SLACK_MS
        others = {name: f for name, f in families.items() if f != "status"}
        seen = first + read_window(settings, codec, request_id, others, start, end)
    return RequestRecords(request_id, row, seen, (start, end))


def terminal_row(settings: Settings, request_id: str) -> dict[str, Any] | None:
    """The request's row of the ``requests`` table as a dict (column name to value); None if it has none."""
    ks = settings.cassandra.keyspace
    cluster, session = connect(settings.cassandra)
    try:
        register_types(cluster, ks)
        row = session.execute(f"SELECT * FROM {ks}.requests WHERE request_id = %s", (request_id,)).one()
    finally:
        cluster.shutdown()
    return None if row is None else row._asdict()


def read_window(
    settings: Settings,
    codec: Codec,
    request_id: str,
    families: Mapping[str, str],
    start_ms: int,
    end_ms: int,
) -> list[Seen]:
    """Records of ``request_id`` on ``families``' topics (those that exist) stamped in [start_ms, end_ms]."""
    reader = BoundedRead(settings, list(families), start_ms, READ_TIMEOUT_S, "trace", until_ms=end_ms)
    found = []
    for msg in reader:
        seen = _belongs(msg, codec, request_id, families[str(msg.topic())])
        if seen is not None:
            found.append(seen)
    return found


def _belongs(msg: Any, codec: Codec, request_id: str, family: str) -> Seen | None:
    headers = header_map(msg)
    named = msg.key() == request_id.encode() or headers.get("request_id") == request_id.encode()
    if not named and family not in ("requests", "retry"):
        return None
    try:
        record = codec.read(msg.value(), FAMILIES[family])
    except DecodeError:
        return None
    if isinstance(record, RetryEnvelope):
        inner = {h.key: h.value for h in record.headers}
        named = named or inner.get("request_id") == request_id.encode()
        headers = {k: v for k, v in inner.items() if v is not None}
    elif isinstance(record, GenerationRequest):
        named = named or record.request_id == request_id
    if not named:
        return None
    return Seen(family, msg.topic(), msg.partition(), msg.offset(), msg.timestamp()[1], record, headers)


def _epoch_ms(value: Any) -> int:
    stamp = epoch_ms(value)
    assert stamp is not None
    return stamp
