"""The assembler's Cassandra statements: frames that arrived, and the write-once terminal row.

The terminal row of a request is written with ``INSERT ... IF NOT EXISTS`` (a Paxos lightweight
transaction), carrying ``decided_by``: the topic:partition:offset of the input that decided it. A
timeout of that write is ambiguous (it may have been applied), so it is settled by a SERIAL read of the
row, never by retrying blindly.

A rejected request's ``tenant_id`` may be any text the producer sent (``%``, ``tenant:*``, control
characters, U+10FFFF). The row stores it escaped (`stored_tenant_id`: percent-encoding, reversible with
``urllib.parse.unquote``; a valid id is unchanged), so what reads the table (the checker, ``aigc get``)
never meets raw control characters or path syntax, and ``reason_code`` and ``message`` say why it was
rejected. The rows this module hands back carry the id as sent again, so the Completion echoes it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, overload
from urllib.parse import quote, unquote

from cassandra import ConsistencyLevel, WriteTimeout
from cassandra.cluster import ResponseFuture, Session
from cassandra.query import BatchStatement, BatchType, SimpleStatement

from plumbing import tracing
from plumbing.metadata import OutputRow
from plumbing.metrics import time_future, timed_storage
from schemas.records import ModerationVerdict


@dataclass(slots=True, kw_only=True)
class TerminalRow:
    """A request's row in the ``requests`` table (infra/cql/002_tables.cql): its terminal state, written
    once. Fields are in the table's column order; a decision made before rendering leaves the request's
    own columns (kind, model, prompt, ...) empty."""

    request_id: str
    tenant_id: str
    kind: str | None = None
    priority: str | None = None
    model: str | None = None
    prompt: str | None = None
    prompt_end: str | None = None
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    seed: int | None = None
    frame_count: int | None = None
    fps: int | None = None
    output_format: str | None = None
    labels: dict[str, str] | None = None
    status: str
    reason_code: str | None = None
    message: str | None = None
    retry_after_ms: int | None = None
    moderation: dict[str, str] | None = None
    outputs: list[OutputRow] | None = None
    queued_ms: int | None = None
    render_ms: int | None = None
    assemble_ms: int | None = None
    total_ms: int | None = None
    created_at: datetime | None = None
    accepted_at: datetime | None = None
    finished_at: datetime | None = None
    decided_by: str | None = None

    @classmethod
    def of(cls, row: Any) -> TerminalRow:
        """The terminal row of a driver row (a SELECT's, or the one a lost ``IF NOT EXISTS`` answers)."""
        values: dict[str, Any] = {column: getattr(row, column, None) for column in REQUEST_COLUMNS}
        return cls(**values)


REQUEST_COLUMNS = tuple(field.name for field in dataclasses.fields(TerminalRow))


@dataclass(frozen=True)
class FrameRow:
    """One staged frame of a request, as the ``frames`` table holds it."""

    frame_index: int
    task_id: str
    bucket: str
    key: str
    sha256: str
    bytes: int
    render_ms: int
    started_at: int  # epoch ms
    rendered_at: int  # epoch ms


@dataclass(frozen=True)
class TerminalWrite:
    """The outcome of a write-once terminal insert."""

    applied: bool  # this call's row won
    row: TerminalRow  # the row that holds the terminal state now (ours when applied)


def ts(epoch_ms: int | None) -> datetime | None:
    """The Cassandra timestamp of epoch milliseconds (None stays None)."""
    return None if epoch_ms is None else datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)


def ms(value: datetime | None) -> int:
    """Epoch milliseconds of a Cassandra timestamp (a naive one is UTC); 0 for none."""
    if value is None:
        return 0
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


class AssemblyStore:
    """The sink's prepared statements over the ``frames``, ``requests`` and ``requests_by_tenant`` tables."""

    def __init__(self, session: Session, keyspace: str) -> None:
        self.session = session
        ks = keyspace
        self._insert_frame = session.prepare(
            f"INSERT INTO {ks}.frames (request_id, frame_index, task_id, bucket, key, sha256, bytes, "
            "render_ms, "
            "started_at, rendered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        self._frames = session.prepare(
            f"SELECT frame_index, task_id, bucket, key, sha256, bytes, render_ms, started_at, rendered_at "
            f"FROM {ks}.frames WHERE request_id = ?"
        )
        placeholders = ", ".join("?" for _ in REQUEST_COLUMNS)
        self._insert_terminal = session.prepare(
            f"INSERT INTO {ks}.requests ({', '.join(REQUEST_COLUMNS)}) VALUES ({placeholders}) IF NOT EXISTS"
        )
        self._insert_terminal.serial_consistency_level = ConsistencyLevel.SERIAL
        self._terminal = session.prepare(
            f"SELECT {', '.join(REQUEST_COLUMNS)} FROM {ks}.requests WHERE request_id = ?"
        )
        self._terminal_serial = session.prepare(
            f"SELECT {', '.join(REQUEST_COLUMNS)} FROM {ks}.requests WHERE request_id = ?"
        )
        self._terminal_serial.consistency_level = ConsistencyLevel.SERIAL
        self._by_tenant = session.prepare(
            f"INSERT INTO {ks}.requests_by_tenant (tenant_id, month, created_at, request_id, kind, model, "
            "status, "
            "finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        )

    @timed_storage("cassandra", "add_frames")
    def add_frames(self, request_id: str, frames: Sequence[FrameRow]) -> None:
        """Record frames that arrived (an upsert: a re-rendered frame overwrites itself)."""
        if not frames:
            return
        batch = BatchStatement(batch_type=BatchType.UNLOGGED)  # one partition: applied atomically anyway
        for f in frames:
            batch.add(
                self._insert_frame,
                (
                    request_id,
                    f.frame_index,
                    f.task_id,
                    f.bucket,
                    f.key,
                    f.sha256,
                    f.bytes,
                    f.render_ms,
                    ts(f.started_at),
                    ts(f.rendered_at),
                ),
            )
        self.session.execute(batch)

    @timed_storage("cassandra", "frames")
    def frames(self, request_id: str) -> list[FrameRow]:
        """The frames of ``request_id`` recorded so far, in frame order."""
        return [
            FrameRow(
                r.frame_index,
                r.task_id,
                r.bucket,
                r.key,
                r.sha256,
                r.bytes,
                r.render_ms or 0,
                ms(r.started_at),
                ms(r.rendered_at),
            )
            for r in self.session.execute(self._frames, (request_id,))
        ]

    @timed_storage("cassandra", "terminal")
    def terminal(self, request_id: str) -> TerminalRow | None:
        """The terminal row of ``request_id``, or None while it is unfinished."""
        row = self.session.execute(self._terminal, (request_id,)).one()
        return None if row is None else _as_sent(row)

    @tracing.step("assembler.store")
    @timed_storage("cassandra", "write_terminal")
    def write_terminal(self, row: TerminalRow) -> TerminalWrite:
        """Write the terminal row once; tell whether this call won and which row holds the state.

        The row stores ``tenant_id`` escaped (`stored_tenant_id`); the rows handed back carry it as sent,
        so the Completion published from them echoes the producer's tenant id exactly."""
        stored = dataclasses.replace(row, tenant_id=stored_tenant_id(row.tenant_id))
        params = tuple(getattr(stored, column) for column in REQUEST_COLUMNS)
        try:
            result = self.session.execute(self._insert_terminal, params).one()
        except WriteTimeout:
            # Ambiguous: Paxos may have committed our row. A SERIAL read sees any accepted proposal.
            found = self.session.execute(self._terminal_serial, (row.request_id,)).one()
            if found is None:
                return self.write_terminal(row)  # nothing was accepted: safe to propose again
            return TerminalWrite(found.decided_by == row.decided_by, _as_sent(found))
        if result.applied:
            return TerminalWrite(True, row)
        return TerminalWrite(False, _as_sent(result))

    def index_by_tenant_async(self, row: TerminalRow) -> ResponseFuture:
        """Insert the tenant's history row of ``row`` (idempotent); the future settles when it is written."""
        created = row.created_at or row.finished_at
        assert created is not None  # every terminal row has finished_at
        return time_future(
            "cassandra",
            "index_by_tenant",
            self.session.execute_async(
                self._by_tenant,
                (
                    row.tenant_id,
                    f"{created:%Y-%m}",
                    created,
                    row.request_id,
                    row.kind,
                    row.model,
                    row.status,
                    row.finished_at,
                ),
            ),
        )

    def tenant_history(self, keyspace: str, tenant_id: str, month: str, limit: int = 20) -> list[Any]:
        """The newest ``limit`` history rows of ``tenant_id`` in ``month`` (``YYYY-MM``)."""
        statement = SimpleStatement(
            "SELECT created_at, request_id, kind, model, status, finished_at "
            f"FROM {keyspace}.requests_by_tenant "
            "WHERE tenant_id = %s AND month = %s LIMIT %s"
        )
        return list(self.session.execute(statement, (tenant_id, month, limit)))


@overload
def stored_tenant_id(tenant_id: str) -> str: ...
@overload
def stored_tenant_id(tenant_id: None) -> None: ...
def stored_tenant_id(tenant_id: str | None) -> str | None:
    """``tenant_id`` as the terminal row stores it: every character outside ``[A-Za-z0-9_.~-]``
    percent-encoded as UTF-8 (``urllib.parse.quote`` with nothing safe), so a valid id is unchanged and
    ``unquote`` gives back exactly what the producer sent."""
    return None if tenant_id is None else quote(tenant_id, safe="")


def _as_sent(row: Any) -> TerminalRow:
    """A stored row with its tenant id as the producer sent it (``unquote`` of what was stored)."""
    terminal = TerminalRow.of(row)
    if "%" in (terminal.tenant_id or ""):
        terminal.tenant_id = unquote(terminal.tenant_id)
    return terminal


# The moderation column is a map<text, text>; these fields of a ModerationVerdict are written as JSON.
_JSON_FIELDS = ("scores",)


def moderation_row(verdict: ModerationVerdict | None, **extra: str) -> dict[str, str] | None:
    """A ModerationVerdict (plus ``extra`` operator-only entries) as the row's text map: absent values are
    left out, a score is written with repr (exact round trip), scores as JSON."""
    if verdict is None:
        return None
    row = {}
    for key, value in verdict.to_avro().items():
        if value is None:
            continue
        row[key] = json.dumps(value, sort_keys=True) if key in _JSON_FIELDS else str(value)
    return {**row, **extra}


def moderation_verdict(row: Mapping[str, str] | None) -> ModerationVerdict | None:
    """The ModerationVerdict record of a row's moderation map (operator-only entries dropped; rows written
    before a field existed get its schema default)."""
    if not row:
        return None
    model_version = row.get("model_version")
    score = row.get("score")
    scores = row.get("scores")
    return ModerationVerdict(
        category=row.get("category", ""),
        policy_version=row.get("policy_version", ""),
        source=row.get("source", "policy"),
        field=row.get("field", "prompt"),
        reason=row.get("reason", ""),
        # "None": written by str(None) before this codec existed
        model_version=None if model_version == "None" else model_version,
        score=None if score in (None, "None") else float(score),
        scores={k: float(v) for k, v in json.loads(scores).items()} if scores else {},
    )
