"""The delivery checker: did every request of a run end exactly once, and is nothing left behind?

Consumes, read-only: ``aigc.completions``, every ``aigc.dlq.<stage>`` (optionally ``aigc.status``, and
the request topics for `submitted_since`), each from a timestamp or the beginning up to the high
watermarks captured when the read started, with manually assigned partitions and no committed offsets;
the ``<ks>.requests`` (and ``requests_by_tenant``) tables; the results and staging buckets under each
valid tenant id's prefix (a row of a request rejected for its tenant id holds that id escaped, and no
object was ever stored under it: no S3 prefix is built from anything but a validated id). Any id can be
checked: one that could never be a Cassandra key is simply not looked up. Produces a `DeliveryReport`:

- lost: submitted ids with neither a completion nor a dead letter;
- duplicates: ids with more than one completion (the sink promises exactly one);
- orphan rows: terminal rows whose completion never appeared;
- orphan objects: result objects of requests without a SUCCEEDED completion, and staged frames of
  requests that finished (the sink deletes those once the request is recorded);
- mismatched: ids whose row and completion disagree on the status.

Used by ``aigc check`` and by the chaos, poison and replay tests. The bounded reader (`BoundedRead`) and
the dead letter's request id (`dead_letter_ids`) are shared with ``producers.dlq``; ``aigc trace``
(``producers.request_log``) reads its time window with `BoundedRead` too.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from cassandra.cluster import Session
from confluent_kafka import KafkaError, Message, TopicPartition

from plumbing.blobs import BlobStore
from plumbing.errors import DecodeError
from plumbing.kafka_clients import make_consumer, watermarks
from plumbing.metadata import connect
from plumbing.settings import Settings
from plumbing.topics import PRIORITIES, Stage, Topics
from plumbing.validation import ID_PATTERN
from schemas.codec import Codec, default_codec
from schemas.records import (
    CancelRequest,
    Completion,
    DeadLetter,
    FramesRendered,
    GenerationRequest,
    Record,
    RenderTask,
    StatusEvent,
    TenantQuota,
)

log = logging.getLogger(__name__)
POLL_S = 0.2
METADATA_TIMEOUT_S = 10.0
IN_CHUNK = 100  # ids per Cassandra IN query: small partitions fan out fine at this size
R = TypeVar("R", bound=Record)


class BoundedRead:
    """Iterate over the messages of ``topics`` from ``since_ms`` (or the beginning) up to the high
    watermarks captured at the start, so the read ends even while producers keep writing. With
    ``until_ms``, a partition also ends at its first message stamped later than that.

    Partitions are assigned by hand (no group membership, nothing committed). The consumer reads
    committed data only; a partition ends at its captured watermark or at the end-of-partition event,
    which librdkafka raises past transaction markers too (the last offset may be a marker, never a
    message). Partitions still unfinished after ``timeout_s`` are listed in ``unfinished``.
    """

    def __init__(
        self,
        settings: Settings,
        topics: Collection[str],
        since_ms: int | None = None,
        timeout_s: float = 30.0,
        role: str = "checker",
        until_ms: int | None = None,
    ) -> None:
        self.settings = settings
        self.topics = list(dict.fromkeys(topics))
        self.since_ms = since_ms
        self.until_ms = until_ms
        self.timeout_s = timeout_s
        self.role = role
        self.unfinished: list[str] = []
        self.missing_topics: list[str] = []

    def __iter__(self) -> Iterator[Message]:
        group = f"{self.settings.kafka.client_id}.{self.role}.{uuid.uuid4().hex}"
        consumer = make_consumer(self.settings, group, self.role, **{"enable.partition.eof": True})
        try:
            ends = self._assign(consumer)
            deadline = time.monotonic() + self.timeout_s
            while ends and time.monotonic() < deadline:
                msg = consumer.poll(POLL_S)
                if msg is None:
                    continue
                tp = (str(msg.topic()), int(msg.partition() or 0))
                end = ends.get(tp)
                error = msg.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF and end is not None:
                        if (msg.offset() or 0) >= end:
                            self._done(consumer, ends, tp)
                    else:
                        log.warning("%s: %s", self.role, error)
                    continue
                offset = msg.offset() or 0
                if end is None or offset >= end:
                    continue  # written after the read started
                if self.until_ms is not None and msg.timestamp()[1] > self.until_ms:
                    self._done(consumer, ends, tp)
                    continue
                yield msg
                if offset >= end - 1:
                    self._done(consumer, ends, tp)
            self.unfinished = [f"{t}:{p}" for t, p in sorted(ends)]
        finally:
            consumer.close()

    def _assign(self, consumer: Any) -> dict[tuple[str, int], int]:
        metadata = consumer.list_topics(timeout=METADATA_TIMEOUT_S)
        partitions = []
        for topic in self.topics:
            meta = metadata.topics.get(topic)
            if meta is None or meta.error is not None:
                self.missing_topics.append(topic)
                continue
            partitions += [TopicPartition(topic, p) for p in sorted(meta.partitions)]
        starts: dict[tuple[str, int], int] = {}
        if self.since_ms is not None and partitions:
            wanted = [TopicPartition(tp.topic, tp.partition, self.since_ms) for tp in partitions]
            for tp in consumer.offsets_for_times(wanted, timeout=METADATA_TIMEOUT_S):
                starts[(tp.topic, tp.partition)] = tp.offset  # -1: nothing at or after since_ms
        ends: dict[tuple[str, int], int] = {}
        assignment = []
        for tp in partitions:
            low, high = watermarks(consumer, tp, METADATA_TIMEOUT_S)
            start = starts.get((tp.topic, tp.partition), low)
            start = high if start < 0 else max(start, low)
            if start < high:
                ends[(tp.topic, tp.partition)] = high
                assignment.append(TopicPartition(tp.topic, tp.partition, start))
        if assignment:
            consumer.assign(assignment)
        return ends

    @staticmethod
    def _done(consumer: Any, ends: dict[tuple[str, int], int], tp: tuple[str, int]) -> None:
        ends.pop(tp, None)
        consumer.pause([TopicPartition(*tp)])


def dead_letter_ids(record: DeadLetter, codec: Codec) -> tuple[str | None, str | None]:
    """Request and tenant ids of a DeadLetter: its own fields, else from its decodable original value
    (every pipeline record but the envelopes carries request_id and tenant_id)."""
    request_id, tenant_id = record.request_id, record.tenant_id
    if request_id is None or tenant_id is None:
        try:
            original = codec.read_any(record.value)
        except DecodeError:
            return request_id, tenant_id
        found_request, found_tenant = record_ids(original)
        request_id = found_request if request_id is None else request_id
        tenant_id = found_tenant if tenant_id is None else tenant_id
    return request_id, tenant_id


def record_ids(record: Record) -> tuple[str | None, str | None]:
    """The request and tenant ids a top-level record carries; None where it has none (the envelopes)."""
    match record:
        case (
            GenerationRequest()
            | RenderTask()
            | FramesRendered()
            | Completion()
            | StatusEvent()
            | CancelRequest()
            | DeadLetter()
        ):
            return record.request_id, record.tenant_id
        case TenantQuota():
            return None, record.tenant_id
    return None, None


@dataclass(frozen=True)
class DeliveryReport:
    """What `check_delivery` found (see the module docstring); ``ok`` is the verdict."""

    submitted: int
    terminal: dict[str, int]  # status -> count, one per request id
    dead_lettered: int  # submitted ids in some aigc.dlq.* and without a completion
    lost: list[str]  # submitted ids with no completion and no dead letter
    duplicates: dict[str, int]  # request_id -> completions, only those > 1
    orphan_rows: list[str]  # terminal rows with no completion on the topic
    orphan_objects: list[str]  # s3://bucket/key left behind (see the module docstring)
    mismatched: list[str]  # ids whose row status differs from their completion's
    undecodable: int = 0  # records skipped on the topics read
    unfinished: list[str] = field(default_factory=list)  # topic:partition not read to the end in time
    last_status: dict[str, str] = field(default_factory=dict)  # lost id -> last status event, when read

    @property
    def ok(self) -> bool:
        """Nothing lost, duplicated, orphaned or mismatched, and every topic read to its end."""
        return not (
            self.lost
            or self.duplicates
            or self.orphan_rows
            or self.orphan_objects
            or self.mismatched
            or self.unfinished
        )

    def summary(self) -> str:
        """The verdict, the counts and up to 50 ids of each kind of problem, as ``aigc check`` prints them."""
        terminal = ", ".join(f"{s} {n}" for s, n in sorted(self.terminal.items())) or "none"
        lines = [
            f"delivery check: {'OK' if self.ok else 'NOT OK'}",
            f"  submitted {self.submitted}; terminal {sum(self.terminal.values())} ({terminal}); "
            f"dead-lettered {self.dead_lettered}; lost {len(self.lost)}",
        ]

        def section(title: str, items: list[str]) -> None:
            lines.append(f"  {title}: {len(items)}")
            lines.extend(f"    {item}" for item in items[:50])
            if len(items) > 50:
                lines.append(f"    ... and {len(items) - 50} more")

        section("lost", [f"{i}  (last status {self.last_status.get(i, '-')})" for i in self.lost])
        section("duplicated completions", [f"{i}  x{n}" for i, n in sorted(self.duplicates.items())])
        section("orphan rows (no completion)", self.orphan_rows)
        section("orphan objects", self.orphan_objects)
        section("row/completion status mismatches", self.mismatched)
        if self.unfinished:
            section("partitions not read to the end (raise the timeout)", self.unfinished)
        if self.undecodable:
            lines.append(f"  undecodable records skipped: {self.undecodable}")
        return "\n".join(lines)


class _Topics:
    """The checker's bounded reads of a run's topics, sharing one deadline and one tally of what did not
    decode or was not read to the end."""

    def __init__(self, settings: Settings, since_ms: int | None, timeout_s: float) -> None:
        self.settings, self.since_ms = settings, since_ms
        self.codec = default_codec()
        self.deadline = time.monotonic() + timeout_s
        self.undecodable = 0
        self.unfinished: list[str] = []

    def read(self, names: list[str], cls: type[R]) -> Iterator[R]:
        """The ``cls`` records on ``names``; undecodable messages are counted, other records skipped."""
        timeout_s = max(1.0, self.deadline - time.monotonic())
        reader = BoundedRead(self.settings, names, self.since_ms, timeout_s)
        for msg in reader:
            try:
                record = self.codec.read_any(msg.value())
            except DecodeError:
                self.undecodable += 1
                continue
            if isinstance(record, cls):
                yield record
        self.unfinished.extend(reader.unfinished)

    def dead_lettered(self, names: list[str], submitted: set[str]) -> tuple[set[str], set[str]]:
        """The submitted ids with a dead letter on ``names``, and the tenants of those dead letters."""
        dead: set[str] = set()
        tenants: set[str] = set()
        for letter in self.read(names, DeadLetter):
            request_id, tenant_id = dead_letter_ids(letter, self.codec)
            if request_id in submitted:
                dead.add(request_id)
                if tenant_id:
                    tenants.add(tenant_id)
        return dead, tenants

    def last_status(self, name: str, submitted: set[str]) -> dict[str, str]:
        """Submitted id -> "<stage> <state>" of its last status event on ``name``."""
        return {
            event.request_id: f"{event.stage} {event.state}"
            for event in self.read([name], StatusEvent)
            if event.request_id in submitted
        }


def check_delivery(
    settings: Settings,
    request_ids: Collection[str],
    tenants: Collection[str] | None = None,
    since_ms: int | None = None,
    timeout_s: float = 30.0,
    read_status: bool = False,
) -> DeliveryReport:
    """Check the delivery of ``request_ids`` (see the module docstring).

    ``tenants``: whose buckets and tenant rows to inspect (default: the tenants seen for the submitted
    ids). ``since_ms``: where the topic reads start and how far back rows and objects count.
    """
    topics = Topics(settings)
    submitted = set(request_ids)
    reads = _Topics(settings, since_ms, timeout_s)
    completions: dict[str, list[Completion]] = defaultdict(list)
    for completion in reads.read([topics.completions], Completion):
        completions[completion.request_id].append(completion)
    dead, seen_tenants = reads.dead_lettered([topics.dlq(stage) for stage in Stage], submitted)
    last_status = reads.last_status(topics.status, submitted) if read_status else {}

    finished = submitted & completions.keys()
    seen_tenants |= {completions[i][0].tenant_id for i in finished}
    terminal = Counter(str(completions[i][0].status) for i in finished)
    lost = sorted(submitted - finished - dead)
    duplicates = {i: len(completions[i]) for i in sorted(finished) if len(completions[i]) > 1}

    rows = _rows(settings, submitted, tenants, since_ms, completions)
    seen_tenants |= {row.tenant_id for row in rows if row.tenant_id and row.request_id in submitted}
    orphan_rows = sorted(row.request_id for row in rows if row.request_id not in completions)
    mismatched = sorted(
        f"{row.request_id}: row {row.status}, completion {completions[row.request_id][0].status}"
        for row in rows
        if row.request_id in completions and row.status != completions[row.request_id][0].status
    )
    objects = _orphan_objects(
        settings, sorted(set(tenants) if tenants is not None else seen_tenants), since_ms, completions
    )
    return DeliveryReport(
        submitted=len(submitted),
        terminal=dict(terminal),
        dead_lettered=len(dead - finished),
        lost=lost,
        duplicates=duplicates,
        orphan_rows=orphan_rows,
        orphan_objects=objects,
        mismatched=mismatched,
        undecodable=reads.undecodable,
        unfinished=reads.unfinished,
        last_status={i: last_status[i] for i in lost if i in last_status},
    )


def _rows(
    settings: Settings,
    submitted: set[str],
    tenants: Collection[str] | None,
    since_ms: int | None,
    completions: Mapping[str, list[Completion]],
) -> list[Any]:
    """Terminal rows of the submitted ids, plus (when ``tenants`` is given) every row those tenants
    created since ``since_ms`` (else since the earliest submitted request seen), via the tenant index."""
    ks = settings.cassandra.keyspace
    cluster, session = connect(settings.cassandra)
    try:
        ids = set(submitted)
        if tenants:
            created = [c[0].created_at for i, c in completions.items() if i in submitted]
            start = since_ms if since_ms is not None else min((c for c in created if c), default=None)
            if start is not None:
                by_tenant = session.prepare(
                    f"SELECT request_id FROM {ks}.requests_by_tenant "
                    "WHERE tenant_id = ? AND month = ? AND created_at >= ?"
                )
                begin = datetime.fromtimestamp(start / 1000, tz=UTC)
                for tenant in tenants:
                    for month in _months(begin, datetime.now(UTC)):
                        ids.update(r.request_id for r in session.execute(by_tenant, (tenant, month, begin)))
        return select_rows(session, ks, ids)
    finally:
        cluster.shutdown()


def select_rows(session: Session, keyspace: str, request_ids: Collection[str]) -> list[Any]:
    """``request_id, tenant_id, status`` of the terminal rows of ``request_ids`` (IN queries in chunks)."""
    select = session.prepare(
        f"SELECT request_id, tenant_id, status FROM {keyspace}.requests WHERE request_id IN ?"
    )
    # An id that cannot be a partition key (empty, or over 64 KiB) has no row; asking would be an error.
    ordered = sorted(i for i in request_ids if 0 < len(i.encode("utf-8", "surrogatepass")) <= 65535)
    rows: list[Any] = []
    for start in range(0, len(ordered), IN_CHUNK):
        rows += list(session.execute(select, (ordered[start : start + IN_CHUNK],)))
    return rows


def _months(begin: datetime, end: datetime) -> list[str]:
    """``YYYY-MM`` partitions of requests_by_tenant from ``begin`` to ``end``, inclusive."""
    months, year, month = [], begin.year, begin.month
    while (year, month) <= (end.year, end.month):
        months.append(f"{year:04d}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return months


FRAME_NAME = re.compile(r"\d{5}\.[a-z0-9]+")  # a staged frame's file name (plumbing.blobs.frame_key)


def _orphan_objects(
    settings: Settings,
    tenants: list[str],
    since_ms: int | None,
    completions: Mapping[str, list[Completion]],
) -> list[str]:
    """Objects left behind (see the module docstring) under the prefixes of ``tenants``."""
    succeeded = {i for i, c in completions.items() if any(x.status == "SUCCEEDED" for x in c)}
    # S3 times have whole seconds: compare against the start of since_ms's second.
    floor = None if since_ms is None else since_ms // 1000 * 1000
    blobs = BlobStore(settings.s3)
    orphans = []
    # Keys are built from validated ids only, so a tenant id that is not one (a rejected request's,
    # stored escaped) never had an object, and a prefix made of it is not a question to ask S3.
    for tenant in (t for t in tenants if ID_PATTERN.fullmatch(t)):
        # <tenant>/<yyyy>/<mm>/<dd>/<request_id>/<file>: the request id is the fifth segment.
        for key in _keys(blobs, settings.s3.results_bucket, f"{tenant}/", floor):
            parts = key.split("/")
            if len(parts) < 6 or parts[4] not in succeeded:
                orphans.append(f"s3://{settings.s3.results_bucket}/{key}")
        # <tenant>/<request_id>/frames/<n>.<ext>: staged frames outlive their request only by mistake.
        # Other names there are not frames: S3Proxy's filesystem store writes an upload to
        # "<key>-<uuid>" and renames it when complete, so a server stopped mid-upload leaves that file
        # (and lists it as an object); no frame was left behind.
        for key in _keys(blobs, settings.s3.staging_bucket, f"{tenant}/", floor):
            parts = key.split("/")
            if (
                len(parts) == 4
                and parts[2] == "frames"
                and FRAME_NAME.fullmatch(parts[3])
                and parts[1] in completions
            ):
                orphans.append(f"s3://{settings.s3.staging_bucket}/{key}")
    return sorted(orphans)


def _keys(blobs: BlobStore, bucket: str, prefix: str, since_ms: int | None) -> Iterator[str]:
    """Keys under ``prefix`` in ``bucket`` last modified at or after ``since_ms`` (all when None)."""
    for page in blobs.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if since_ms is None or obj["LastModified"].timestamp() * 1000 >= since_ms:
                yield obj["Key"]


def submitted_since(
    settings: Settings, since_ms: int, tenants: Collection[str] | None = None, timeout_s: float = 30.0
) -> set[str]:
    """Request ids found on the request topics since ``since_ms`` (of ``tenants``, when given)."""
    codec = default_codec()
    topics = Topics(settings)
    wanted = set(tenants) if tenants else None
    ids = set()
    for msg in BoundedRead(settings, [topics.requests(p) for p in PRIORITIES], since_ms, timeout_s):
        try:
            request = codec.read(msg.value(), GenerationRequest)
        except DecodeError:
            continue  # poison: the gatekeeper dead-letters it without an id to follow
        if wanted is None or request.tenant_id in wanted:
            ids.add(request.request_id)
    return ids
