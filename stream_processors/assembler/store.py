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

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote

from cassandra import ConsistencyLevel, WriteTimeout
from cassandra.cluster import ResponseFuture, Session
from cassandra.query import BatchStatement, BatchType, SimpleStatement

from plumbing import tracing
from plumbing.metadata import OutputRow
from plumbing.metrics import time_future, timed_storage

REQUEST_COLUMNS = (
    "request_id",
    "tenant_id",
    "kind",
    "priority",
    "model",
    "prompt",
    "prompt_end",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "scheduler",
    "seed",
    "frame_count",
    "fps",
    "output_format",
    "labels",
    "status",
    "reason_code",
    "message",
    "retry_after_ms",
    "moderation",
    "outputs",
    "queued_ms",
    "render_ms",
    "assemble_ms",
    "total_ms",
    "created_at",
    "accepted_at",
    "finished_at",
    "decided_by",
)


@dataclass(frozen=True)
class FrameRow:
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
    applied: bool
    row: Any  # the row that holds the terminal state now (ours when applied)


def ts(epoch_ms: int | None) -> datetime | None:
    return None if epoch_ms is None else datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)


def ms(value: datetime | None) -> int:
    if value is None:
        return 0
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


class AssemblyStore:
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
    def terminal(self, request_id: str) -> Any:
        """The terminal row of ``request_id``, or None while it is unfinished."""
        return _as_sent(self.session.execute(self._terminal, (request_id,)).one())

    @tracing.step("assembler.store")
    @timed_storage("cassandra", "write_terminal")
    def write_terminal(self, values: dict[str, Any]) -> TerminalWrite:
        """Write the terminal row once; tell whether this call won and which row holds the state.

        The row stores ``tenant_id`` escaped (`stored_tenant_id`); the rows handed back carry it as sent,
        so the Completion published from them echoes the producer's tenant id exactly."""
        stored = {**values, "tenant_id": stored_tenant_id(values["tenant_id"])}
        params = tuple(stored.get(column) for column in REQUEST_COLUMNS)
        try:
            result = self.session.execute(self._insert_terminal, params).one()
        except WriteTimeout:
            # Ambiguous: Paxos may have committed our row. A SERIAL read sees any accepted proposal.
            row = self.session.execute(self._terminal_serial, (values["request_id"],)).one()
            if row is None:
                return self.write_terminal(values)  # nothing was accepted: safe to propose again
            return TerminalWrite(row.decided_by == values["decided_by"], _as_sent(row))
        if result.applied:
            return TerminalWrite(True, _Row(values))
        return TerminalWrite(False, _as_sent(result))

    def index_by_tenant_async(self, values: Mapping[str, Any]) -> ResponseFuture:
        created: datetime = values["created_at"] or values["finished_at"]
        return time_future(
            "cassandra",
            "index_by_tenant",
            self.session.execute_async(
                self._by_tenant,
                (
                    values["tenant_id"],
                    f"{created:%Y-%m}",
                    created,
                    values["request_id"],
                    values["kind"],
                    values["model"],
                    values["status"],
                    values["finished_at"],
                ),
            ),
        )

    def tenant_history(self, keyspace: str, tenant_id: str, month: str, limit: int = 20) -> list[Any]:
        statement = SimpleStatement(
            "SELECT created_at, request_id, kind, model, status, finished_at "
            f"FROM {keyspace}.requests_by_tenant "
            "WHERE tenant_id = %s AND month = %s LIMIT %s"
        )
        return list(self.session.execute(statement, (tenant_id, month, limit)))


def stored_tenant_id(tenant_id: str | None) -> str | None:
    """``tenant_id`` as the terminal row stores it: every character outside ``[A-Za-z0-9_.~-]``
    percent-encoded as UTF-8 (``urllib.parse.quote`` with nothing safe), so a valid id is unchanged and
    ``unquote`` gives back exactly what the producer sent."""
    return None if tenant_id is None else quote(tenant_id, safe="")


def _as_sent(row: Any) -> Any:
    """A stored row with its tenant id as the producer sent it (``unquote`` of what was stored)."""
    if row is None or "%" not in (row.tenant_id or ""):
        return row  # nothing escaped: the common case keeps the driver's row
    return _Row({**as_values(row), "tenant_id": unquote(row.tenant_id)})


class _Row:
    """Attribute access over the values we just wrote, shaped like a driver row."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update({column: values.get(column) for column in REQUEST_COLUMNS})


def as_values(row: Any) -> dict[str, Any]:
    """A terminal row (from the driver, or the values just written) as column -> value."""
    return {column: getattr(row, column, None) for column in REQUEST_COLUMNS}


def output_rows(outputs: Sequence[dict[str, Any]]) -> list[OutputRow]:
    return [
        OutputRow(
            o["kind"],
            o["bucket"],
            o["key"],
            o["content_type"],
            o["bytes"],
            o["sha256"],
            o["width"],
            o["height"],
            o.get("duration_ms"),
            o.get("frames"),
            o.get("fps"),
        )
        for o in outputs
    ]


# The moderation column is a map<text, text>; these fields of a ModerationVerdict are not text.
_FLOAT_FIELDS = ("score",)
_JSON_FIELDS = ("scores",)


def moderation_row(verdict: Mapping[str, Any] | None, **extra: str) -> dict[str, str] | None:
    """A ModerationVerdict (plus ``extra`` operator-only entries) as the row's text map: absent values are
    left out, a score is written with repr (exact round trip), scores as JSON."""
    if not verdict:
        return None
    row = {}
    for key, value in verdict.items():
        if value is None:
            continue
        row[key] = json.dumps(value, sort_keys=True) if key in _JSON_FIELDS else str(value)
    return {**row, **extra}


def moderation_verdict(row: Mapping[str, str] | None) -> dict[str, Any] | None:
    """The ModerationVerdict record of a row's moderation map (operator-only entries dropped; rows written
    before a field existed get its schema default)."""
    if not row:
        return None
    verdict: dict[str, Any] = {
        "category": row.get("category", ""),
        "policy_version": row.get("policy_version", ""),
        "source": row.get("source", "policy"),
        "field": row.get("field", "prompt"),
        "reason": row.get("reason", ""),
        "model_version": row.get("model_version"),
        "score": None,
        "scores": {},
    }
    for key in _FLOAT_FIELDS:
        if row.get(key) not in (None, "None"):
            verdict[key] = float(row[key])
    for key in _JSON_FIELDS:
        if row.get(key):
            verdict[key] = {k: float(v) for k, v in json.loads(row[key]).items()}
    if verdict["model_version"] == "None":  # written by str(None) before this codec existed
        verdict["model_version"] = None
    return verdict
