"""`aigc dlq ls | show | replay`: inspect dead letters and send them back where they came from.

Consumes ``aigc.dlq.<stage>`` (DeadLetter records, read-only, nothing committed), the original topics'
headers and ``<ks>.requests``; `replay` with ``execute=True`` produces the original messages back onto
their original topics, and nothing else. Without ``execute`` it is a dry run that writes nowhere.

Replay sends the original key, value and headers byte for byte, minus the retry relay's attempt headers
(``aigc.attempts``, ``aigc.first_failed_at``: a replay is a fresh start), plus ``aigc.origin`` (the
input's first coordinates, as the relay sets it, unless the original already had one) and
``aigc.replayed_from`` = the dead letter's ``topic:partition:offset``, waits for the broker's
acknowledgement of each, and is paced to ``rate`` messages per second. Before sending, each original
is decoded with today's codec (a GenerationRequest is also validated as the gatekeeper would) and must
be the record its topic carries; anything else is skipped with the reason.

Idempotency: replaying the same dead letters again never makes a second result. A dead letter is
skipped when
1. its request already has a terminal row in ``<ks>.requests`` ("already finished"): the pipeline
   finished it (after an earlier replay or otherwise), and the sink would not publish a second result
   anyway (a webhook dead letter: its completion is already in ``<ks>.webhook_deliveries``, "already
   finished (webhook delivered)"; it goes back to ``aigc.webhooks.redeliveries``, never to the
   completions topic); or
2. its coordinate already appears as ``aigc.replayed_from`` on a message of its original topic written
   since its last failure ("already replayed"): an earlier replay is still in flight. If that copy fails
   again it becomes a new dead letter, which is the one to replay next.
Rule 2 holds while the copy stays in the original topic (its retention); the sink's write-once row
covers what comes after. Dead letters of the same original message in one run are sent once.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple

from plumbing.clock import now_ms
from plumbing.errors import DecodeError, DeliveryError, ValidationError
from plumbing.headers import ATTEMPTS, FIRST_FAILED_AT, ORIGIN, REPLAYED_FROM, Headers
from plumbing.kafka_clients import header_list, make_admin, make_producer, produce_sync
from plumbing.metadata import connect
from plumbing.settings import Settings
from plumbing.topics import Stage, Topics
from plumbing.validation import validate_request
from producers.checker import BoundedRead, dead_letter_ids, select_rows
from schemas.codec import Codec, default_codec
from schemas.records import DeadLetter, GenerationRequest, Header

# Dead letters and replays are written after the failure they record, by clocks that may differ a little.
CLOCK_SLACK_MS = 60_000
PREVIEW_BYTES = 200


def iso(epoch_ms: int) -> str:
    """Epoch milliseconds as an ISO 8601 UTC time to the millisecond."""
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class DeadLetterEntry:
    """One message of a dead-letter topic; ``record`` is None when it is not a DeadLetter at all."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    record: DeadLetter | None
    problem: str | None = None  # why ``record`` is None
    request_id: str | None = None
    tenant_id: str | None = None

    @property
    def coordinate(self) -> str:
        """The dead letter's own ``topic:partition:offset``."""
        return f"{self.topic}:{self.partition}:{self.offset}"

    @property
    def stage(self) -> str:
        """The stage that gave up: the record's, else the last part of the topic's name."""
        return self.record.stage if self.record else self.topic.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Filters:
    """Which dead letters an operation applies to; empty collections mean "any"."""

    stages: Collection[str] = ()
    error_kinds: Collection[str] = ()
    error_codes: Collection[str] = ()
    tenants: Collection[str] = ()
    request_ids: Collection[str] = ()
    since_ms: int | None = None  # last_failed_at >= since_ms
    until_ms: int | None = None  # last_failed_at < until_ms
    limit: int | None = None

    def topics(self, topics: Topics) -> list[str]:
        """The dead-letter topics of the chosen stages."""
        return [topics.dlq(s) for s in Stage if not self.stages or s.value in self.stages]

    def matches(self, entry: DeadLetterEntry) -> bool:
        """Whether ``entry`` passes every filter that is set."""
        if self.stages and entry.stage not in self.stages:
            return False
        r = entry.record
        if r is None:  # nothing to match on but the topic: only listed when no other filter is set
            return not (
                self.error_kinds
                or self.error_codes
                or self.tenants
                or self.request_ids
                or self.since_ms is not None
                or self.until_ms is not None
            )
        return (
            (not self.error_kinds or r.error_kind in self.error_kinds)
            and (not self.error_codes or r.error_code in self.error_codes)
            and (not self.tenants or entry.tenant_id in self.tenants)
            and (not self.request_ids or entry.request_id in self.request_ids)
            and (self.since_ms is None or r.last_failed_at >= self.since_ms)
            and (self.until_ms is None or r.last_failed_at < self.until_ms)
        )


def read_dead_letters(
    settings: Settings, filters: Filters, codec: Codec | None = None, timeout_s: float = 30.0
) -> list[DeadLetterEntry]:
    """The matching dead letters, oldest first (by time written), at most ``filters.limit``."""
    codec = codec or default_codec()
    start = None if filters.since_ms is None else filters.since_ms - CLOCK_SLACK_MS
    entries = []
    reader = BoundedRead(settings, filters.topics(Topics(settings)), start, timeout_s, "dlq")
    for msg in reader:
        coords = (str(msg.topic()), int(msg.partition() or 0), int(msg.offset() or 0), msg.timestamp()[1])
        try:
            record = codec.read(msg.value(), DeadLetter)
        except DecodeError as exc:
            entry = DeadLetterEntry(*coords, None, f"not a DeadLetter ({exc.code}: {exc})")
        else:
            entry = DeadLetterEntry(*coords, record, None, *dead_letter_ids(record, codec))
        if filters.matches(entry):
            entries.append(entry)
    _read_to_the_end(reader)
    entries.sort(key=lambda e: (e.timestamp_ms, e.topic, e.partition, e.offset))
    return entries[: filters.limit] if filters.limit is not None else entries


# -- ls and show --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DlqCounts:
    """Dead letters counted by stage, error kind and code (`aigc dlq ls`)."""

    total: int
    by_stage_kind: dict[tuple[str, str], int]
    by_code: dict[str, int]
    not_dead_letters: int  # messages on a dead-letter topic that are not DeadLetter records
    by_stage_reason: dict[tuple[str, str, str], int] = field(default_factory=dict)  # stage, kind, code

    def format(self) -> str:
        """The counts as ``aigc dlq ls`` prints them, the most frequent first."""
        lines = [f"dead letters: {self.total}"]
        if self.not_dead_letters:
            lines[0] += f" ({self.not_dead_letters} not decodable as DeadLetter)"
        lines.append("by stage and reason (error kind, code):")
        lines += [
            f"  {s:<12} {k:<14} {c:<28} {n}"
            for (s, k, c), n in sorted(self.by_stage_reason.items(), key=lambda x: (x[0][0], -x[1], x[0]))
        ]
        lines.append("by error code:")
        lines += [f"  {c:<28} {n}" for c, n in sorted(self.by_code.items(), key=lambda x: (-x[1], x[0]))]
        return "\n".join(lines)


def count(entries: Collection[DeadLetterEntry]) -> DlqCounts:
    """The counts of ``entries`` by stage, error kind and code."""
    stage_reason: Counter[tuple[str, str, str]] = Counter()
    for e in entries:
        if e.record is None:
            kind = code = "(undecodable)"
        else:
            kind, code = e.record.error_kind, e.record.error_code or "(none)"
        stage_reason[(e.stage, kind, code)] += 1
    stage_kind: Counter[tuple[str, str]] = Counter()
    codes: Counter[str] = Counter()
    for (stage, kind, code), n in stage_reason.items():
        stage_kind[(stage, kind)] += n
        codes[code] += n
    bad = sum(1 for e in entries if e.record is None)
    return DlqCounts(len(entries), dict(stage_kind), dict(codes), bad, dict(stage_reason))


def format_line(entry: DeadLetterEntry) -> str:
    """One line per dead letter (`dlq ls --verbose`): where, when, stage, reason and whose."""
    r = entry.record
    reason = f"{r.error_kind} {r.error_code or '(none)'}" if r else f"({entry.problem})"
    return f"{entry.coordinate}  {iso(entry.timestamp_ms)}  {entry.stage}  {reason}  {_who(entry)}"


def preview(data: bytes | None, limit: int = PREVIEW_BYTES) -> str:
    """The first ``limit`` bytes, printable ASCII as is and everything else as ``\\xNN``."""
    if data is None:
        return "(null)"
    shown = "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in data[:limit])
    more = f" ... (+{len(data) - limit} bytes)" if len(data) > limit else ""
    return f"{len(data)} bytes: {shown}{more}"


def _text(value: bytes | None) -> str:
    if value is None:
        return "(null)"
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + value.hex()
    return text if text.isprintable() else repr(text)


def describe_value(codec: Codec, value: bytes | None) -> str:
    """Pretty JSON of the decoded record, or why it does not decode and a preview of its bytes."""
    # The original may be any record, or none, of any schema version: the tool prints the datum as it
    # decodes (fastavro's dict), whatever the record, rather than a class that may not fit it.
    try:
        name, record = codec.decode_any(value)
    except DecodeError as exc:
        return f"undecodable ({exc.code}: {exc})\n{preview(value)}"
    body = json.dumps(record, indent=2, ensure_ascii=False, default=_json_default)
    return f"{name}\n{body}"


def _json_default(value: object) -> str:
    return "0x" + value.hex() if isinstance(value, bytes) else str(value)


def format_entry(entry: DeadLetterEntry, codec: Codec) -> str:
    """A dead letter as ``aigc dlq show`` prints it: failure, original coordinates, headers and value."""
    r = entry.record
    if r is None:
        return f"{entry.coordinate}  {entry.problem}"
    lines = [
        f"{entry.coordinate}  stage {r.stage}  {r.error_kind} {r.error_code or '-'}  attempts {r.attempts}",
        f"  error: {r.error_message}",
        f"  failed: first {iso(r.first_failed_at)}, last {iso(r.last_failed_at)}",
        f"  original: {_original(r)}  key {_text(r.key)}  request {entry.request_id or '-'}  "
        f"tenant {entry.tenant_id or '-'}",
        "  headers: " + (", ".join(f"{h.key}={_text(h.value)}" for h in r.headers) or "none"),
    ]
    value = describe_value(codec, r.value).replace("\n", "\n    ")
    lines.append(f"  value: {value}")
    return "\n".join(lines)


# -- replay -------------------------------------------------------------------------------------------
class ReplayAction(NamedTuple):
    """What replay did, or would do, with one dead letter."""

    coordinate: str  # dead letter's topic:partition:offset
    action: str  # "would send" (dry run), "sent", "skip" or "failed"
    reason: str
    stage: str = ""  # the dead letter's stage and error code, for the summary
    code: str = ""
    why: str = ""  # the reason without what is particular to one record, for the summary


@dataclass(frozen=True)
class ReplayReport:
    """Every dead letter a replay considered and what it did with each."""

    dry_run: bool
    actions: list[ReplayAction]

    def of(self, action: str) -> list[ReplayAction]:
        """The actions of one kind ("would send", "sent", "skip" or "failed")."""
        return [a for a in self.actions if a.action == action]

    @property
    def failed(self) -> bool:
        """Whether a send failed (replay stops sending after the first)."""
        return bool(self.of("failed"))

    def summary(self) -> str:
        """Counts by action, then by stage, error code and reason: a few lines however many records."""
        counts = Counter(a.action for a in self.actions)
        told = ", ".join(f"{n} {a}" for a, n in sorted(counts.items())) or "nothing matched"
        lines = [f"replay{' (dry run: nothing sent; --execute sends)' if self.dry_run else ''}: {told}"]
        groups = Counter((a.stage, a.code, a.action + (f": {a.why}" if a.why else "")) for a in self.actions)
        if groups:
            lines.append("by stage and reason (error code, what replay does):")
            lines += [f"  {s:<12} {c:<28} {w:<52} {n}" for (s, c, w), n in sorted(groups.items())]
        return "\n".join(lines)

    def lines(self) -> list[str]:
        """One line per dead letter (`--verbose`)."""
        return [f"{a.coordinate}  {a.action}: {a.reason}" for a in self.actions]


class Pacer:
    """At most ``rate`` sends per second, without bursts: each send waits for its own slot."""

    def __init__(
        self,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.interval = 1.0 / rate
        self.clock, self.sleep = clock, sleep
        self._next: float | None = None

    def wait(self) -> None:
        """Return when this send's slot has come."""
        now = self.clock()
        if self._next is not None and now < self._next:
            self.sleep(self._next - now)
            now = self._next
        self._next = now + self.interval


def replay_headers(headers: Sequence[Header], coordinate: str, original: str) -> Headers:
    """The original headers without the retry relay's attempt count, plus the input's identity
    (``aigc.origin``: kept if the original had one, else its coordinates ``original``, as the relay
    does) and the dead letter this copy came from."""
    kept: Headers = [(h.key, h.value) for h in headers if h.key not in (ATTEMPTS, FIRST_FAILED_AT)]
    if not any(key == ORIGIN and value for key, value in kept):
        kept.append((ORIGIN, original.encode()))
    return [*kept, (REPLAYED_FROM, coordinate.encode())]


def revalidate(entry: DeadLetterEntry, settings: Settings, codec: Codec, now_ms: int) -> str | None:
    """Why the dead letter's original cannot be sent back today, or None when it can."""
    if entry.record is None:
        return entry.problem or "not a DeadLetter"
    topics = Topics(settings)
    try:
        original = codec.read_any(entry.record.value)
    except DecodeError as exc:
        return f"undecodable with today's schemas ({exc.code}: {exc})"
    carries = {spec.name: spec.schema for spec in topics.all()}.get(entry.record.original_topic)
    if carries is not None and carries != original.SCHEMA:
        return f"{entry.record.original_topic} carries {carries}, not {original.SCHEMA}"
    if isinstance(original, GenerationRequest):
        try:
            validate_request(original, settings.limits, settings.models.keys(), topics.reply_prefix, now_ms)
        except ValidationError as exc:
            return f"invalid request ({exc.code}: {exc})"
    return None


def replay(
    settings: Settings,
    filters: Filters,
    execute: bool = False,
    rate: float = 50.0,
    timeout_s: float = 30.0,
    echo: Callable[[str], None] | None = None,
) -> ReplayReport:
    """Replay the matching dead letters (a dry run unless ``execute``); ``echo`` hears each action."""
    codec = default_codec()
    now = now_ms()
    entries = read_dead_letters(settings, filters, codec, timeout_s)
    problems = {e.coordinate: revalidate(e, settings, codec, now) for e in entries}
    live = [e for e in entries if problems[e.coordinate] is None]
    hooks = Stage.WEBHOOKS.value
    finished = _terminal_rows(settings, {e.request_id for e in live if e.request_id and e.stage != hooks})
    delivered = _delivered_webhooks(
        settings, {e.request_id for e in live if e.request_id and e.stage == hooks}
    )

    def done(entry: DeadLetterEntry) -> Mapping[str, str]:
        """A webhook dead letter is done once delivered; any other once its request is finished."""
        return delivered if entry.stage == hooks else finished

    replayed = _replayed(settings, [e for e in live if e.request_id not in done(e)], timeout_s)
    existing = set(make_admin(settings).list_topics(timeout=10).topics) if live else set()
    producer = make_producer(settings, "dlq-replay") if execute and live else None
    pacer = Pacer(rate)
    sent_originals: dict[str, str] = {}
    actions: list[ReplayAction] = []
    stopped: str | None = None
    for entry in entries:
        action = _decide(entry, problems, done(entry), replayed, existing, sent_originals, stopped)
        if action is None:
            record = entry.record
            assert record is not None  # revalidate passed
            topic = record.original_topic
            sent_originals[_original(record)] = entry.coordinate
            if producer is None:
                action = ReplayAction(entry.coordinate, "would send", f"to {topic} ({_who(entry)})")
            else:
                pacer.wait()
                try:
                    msg = produce_sync(
                        producer,
                        topic,
                        record.value,
                        key=record.key,
                        headers=replay_headers(record.headers, entry.coordinate, _original(record)),
                        timeout_s=timeout_s,
                    )
                except DeliveryError as exc:
                    stopped = f"stopped after a failed send: {exc}"
                    action = ReplayAction(entry.coordinate, "failed", str(exc))
                else:
                    where = f"{msg.topic()}:{msg.partition()}:{msg.offset()}"
                    action = ReplayAction(entry.coordinate, "sent", f"to {where} ({_who(entry)})")
        code = (entry.record.error_code or "(none)") if entry.record else "(undecodable)"
        action = action._replace(stage=entry.stage, code=code)
        actions.append(action)
        if echo is not None:
            echo(f"{action.coordinate}  {action.action}: {action.reason}")
    return ReplayReport(dry_run=not execute, actions=actions)


def _decide(
    entry: DeadLetterEntry,
    problems: Mapping[str, str | None],
    finished: Mapping[str, str],
    replayed: Mapping[str, str],
    existing: Collection[str],
    sent_originals: Mapping[str, str],
    stopped: str | None,
) -> ReplayAction | None:
    """A skip (or a note that sending stopped), or None when the entry is to be sent."""

    def skip(reason: str, why: str) -> ReplayAction:
        return ReplayAction(entry.coordinate, "skip", reason, why=why)

    problem = problems[entry.coordinate]
    if problem is not None:
        return skip(problem, problem_kind(problem))
    record = entry.record
    assert record is not None
    if entry.request_id is not None and entry.request_id in finished:
        status = finished[entry.request_id]
        return skip(f"already finished ({status})", f"already finished ({status})")
    if entry.coordinate in replayed:
        return skip(f"already replayed as {replayed[entry.coordinate]}", "already replayed")
    if record.original_topic not in existing:
        return skip(f"original topic {record.original_topic} does not exist", "original topic missing")
    if _original(record) in sent_originals:
        return skip(f"same original message as {sent_originals[_original(record)]}", "same original")
    if stopped is not None:
        return skip(stopped, "stopped after a failed send")
    return None


def problem_kind(problem: str) -> str:
    """A revalidation problem without its record's details: "invalid request (UNKNOWN_MODEL: no model
    'x')" -> "invalid request (UNKNOWN_MODEL)"."""
    match = re.match(r"(.*?) \((\w+)[:)]", problem)
    if match:
        return f"{match[1]} ({match[2]})"
    return re.split(r" \(|: ", problem, maxsplit=1)[0]


def _original(record: DeadLetter) -> str:
    """The original message's ``topic:partition:offset``."""
    return f"{record.original_topic}:{record.original_partition}:{record.original_offset}"


def _who(entry: DeadLetterEntry) -> str:
    """Whose dead letter it is, for a report line."""
    return f"request {entry.request_id or '-'}, tenant {entry.tenant_id or '-'}"


def _terminal_rows(settings: Settings, request_ids: set[str]) -> dict[str, str]:
    """request_id -> status of those with a terminal row."""
    if not request_ids:
        return {}
    cluster, session = connect(settings.cassandra)
    try:
        return {
            r.request_id: r.status for r in select_rows(session, settings.cassandra.keyspace, request_ids)
        }
    finally:
        cluster.shutdown()


def _delivered_webhooks(settings: Settings, request_ids: set[str]) -> dict[str, str]:
    """request_id -> "webhook delivered" for those in ``webhook_deliveries`` (infra/cql/003_webhooks.cql)."""
    if not request_ids:
        return {}
    cluster, session = connect(settings.cassandra)
    try:
        query = session.prepare(
            f"SELECT request_id FROM {settings.cassandra.keyspace}.webhook_deliveries WHERE request_id = ?"
        )
        return {i: "webhook delivered" for i in request_ids if session.execute(query, (i,)).one() is not None}
    finally:
        cluster.shutdown()


def _replayed(settings: Settings, entries: list[DeadLetterEntry], timeout_s: float) -> dict[str, str]:
    """Dead-letter coordinate -> coordinate of its replay, for replays still in the original topics."""
    if not entries:
        return {}
    since = min(e.record.last_failed_at for e in entries if e.record) - CLOCK_SLACK_MS
    topics = sorted({e.record.original_topic for e in entries if e.record})
    found: dict[str, str] = {}
    reader = BoundedRead(settings, topics, since, timeout_s, "dlq-replay-scan")
    for msg in reader:
        for key, value in header_list(msg):
            if key == REPLAYED_FROM and value:
                found[value.decode("utf-8", "replace")] = f"{msg.topic()}:{msg.partition()}:{msg.offset()}"
    _read_to_the_end(reader)  # a replay missed here would be sent twice
    return found


def _read_to_the_end(reader: BoundedRead) -> None:
    """Raise when the reader gave up on a partition before its end: the answer would be incomplete."""
    if reader.unfinished:
        raise RuntimeError(
            f"{', '.join(reader.unfinished)} not read to the end in {reader.timeout_s:g} s; raise --timeout"
        )
