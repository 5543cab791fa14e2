"""A request's timeline, built from the pipeline's own records (no tracing backend): `aigc trace`.

Input: the records that name one request, as `producers.request_log` reads them: the GenerationRequest,
status events, render outcomes (FramesRendered), decisions, completions, retry envelopes and dead
letters from Kafka, and the terminal row from Cassandra. Output: a `Timeline` of steps in time order
(created, admitted, each render task started and finished, assembling, the terminal state, every retry
and dead letter), each with the wait before it or the work it took, and one line per render task.
Pure: no I/O, so it is tested on recorded events.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC
from typing import Any, TypeVar

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from schemas.records import (
    Completion,
    DeadLetter,
    FramesRendered,
    GenerationRequest,
    Record,
    RetryEnvelope,
    StatusEvent,
)

R = TypeVar("R", bound=Record)

# Topic families the timeline reads, and the record each holds.
FAMILIES: dict[str, type[Record]] = {
    "requests": GenerationRequest,
    "status": StatusEvent,
    "frames": FramesRendered,
    "decisions": Completion,
    "completions": Completion,
    "retry": RetryEnvelope,
    "dlq": DeadLetter,
}
# Stage order for steps at the same millisecond.
_ORDER = {"producer": 0, "gatekeeper": 1, "renderer": 2, "relay": 3, "assembler": 4, "dlq": 5}
_TIMINGS = ("queued_ms", "render_ms", "assemble_ms", "total_ms")


@dataclass(frozen=True)
class Seen:
    """One record found on a topic of ``family`` (one of `FAMILIES`), with its Kafka coordinates."""

    family: str
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    record: Record
    headers: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """One thing that happened to the request, at ``at_ms`` (epoch ms), in ``stage``."""

    at_ms: int
    stage: str
    event: str
    detail: str = ""
    wait_ms: int | None = None  # time spent waiting before this step (queued, waiting for frames)
    work_ms: int | None = None  # time spent working, ending at this step


@dataclass(frozen=True)
class TaskLine:
    """One render task: its outcome, who rendered it, and when it was enqueued, started and finished."""

    task_id: str
    outcome: str
    worker_id: str | None
    attempt: int
    batch_size: int
    frames: str  # "[start, end)"
    enqueued_at: int | None
    started_at: int | None
    finished_at: int | None
    wait_ms: int | None
    work_ms: int | None
    render_ms: int | None


@dataclass
class Timeline:
    """What `build` makes of a request's records: who and what it was, its steps in time order, its render
    tasks, and how it ended."""

    request_id: str
    tenant_id: str | None = None
    priority: str | None = None
    kind: str | None = None
    trace_id: str | None = None
    created_at: int | None = None
    status: str = "UNKNOWN"  # the terminal status, DEAD_LETTERED, IN_PROGRESS, or UNKNOWN (nothing found)
    reason: str | None = None
    timings: dict[str, int] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    tasks: list[TaskLine] = field(default_factory=list)
    retries: int = 0
    dead_letters: int = 0

    @property
    def stages(self) -> list[str]:
        """The stages that have a step, in pipeline order."""
        return sorted({s.stage for s in self.steps}, key=lambda s: _ORDER.get(s, 9))

    def to_json(self) -> dict[str, Any]:
        """The timeline as plain data (``aigc trace --json``)."""
        return {**asdict(self), "stages": self.stages}


@dataclass(frozen=True)
class _Terminal:
    """How the request ended, from its terminal row or else its Completion."""

    status: str
    reason: str | None
    timings: dict[str, int]
    finished_at: int | None


def epoch_ms(value: Any) -> int | None:
    """A timestamp as epoch ms: ints as they are, datetimes converted (Cassandra gives naive UTC)."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return int(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


def _since(later: int | None, earlier: int | None) -> int | None:
    return max(0, later - earlier) if later is not None and earlier is not None else None


def _of(seen: Iterable[Seen], cls: type[R]) -> list[tuple[Seen, R]]:
    """The ``cls`` records among ``seen``, each with where it was seen."""
    return [(s, s.record) for s in seen if isinstance(s.record, cls)]


def build(request_id: str, seen: Iterable[Seen], row: Mapping[str, Any] | None = None) -> Timeline:
    """The timeline of ``request_id`` from the records found for it and its terminal row (if any)."""
    t = Timeline(request_id)
    records = sorted(seen, key=lambda s: (s.timestamp_ms, s.topic, s.offset))
    family: dict[str, list[Seen]] = {}
    for s in records:
        family.setdefault(s.family, []).append(s)
    t.trace_id = _trace_id(records)
    _identify(t, records, row)

    steps = t.steps
    if t.created_at is not None:
        steps.append(Step(t.created_at, "producer", "created", f"priority {t.priority or '?'}"))
    for s in family.get("requests", []):
        steps.append(
            Step(
                s.timestamp_ms,
                "producer",
                "submitted",
                f"on {s.topic}",
                wait_ms=_since(s.timestamp_ms, t.created_at),
            )
        )
    frames = [r for _, r in _of(family.get("frames", []), FramesRendered)]
    last_frame_at, running = _status_steps(t, _of(family.get("status", []), StatusEvent), frames)
    for s, decision in _of(family.get("decisions", []), Completion):
        at = epoch_ms(decision.finished_at) or s.timestamp_ms
        detail = decision.status + (
            f" {decision.reason_code}: {decision.message or ''}" if decision.reason_code else ""
        )
        steps.append(Step(at, "gatekeeper", "decided", detail, wait_ms=_since(at, t.created_at)))
    _task_steps(t, {r.task_id: r for r in frames}, running)
    _failure_steps(t, family)

    completions = _of(family.get("completions", []), Completion)
    completion_seen, completion = completions[0] if completions else (None, None)
    terminal = _terminal_of(row, completion)
    if terminal is not None:
        t.status, t.reason, t.timings = terminal.status, terminal.reason, terminal.timings
        finished_at = terminal.finished_at or (
            completion_seen.timestamp_ms if completion_seen is not None else None
        )
        if finished_at is not None:
            detail = t.status + (f" {t.reason}" if t.reason else "")
            work = _since(finished_at, last_frame_at) if last_frame_at else None
            steps.append(Step(finished_at, "assembler", "completed", detail, work_ms=work))
    elif t.dead_letters:
        t.status = "DEAD_LETTERED"  # the other way a request ends: in a DLQ, for an operator to replay
    elif steps:
        t.status = "IN_PROGRESS"
    steps.sort(key=lambda s: (s.at_ms, _ORDER.get(s.stage, 9)))
    return t


def _trace_id(records: list[Seen]) -> str | None:
    """The trace id of the first well-formed traceparent header among ``records``."""
    for s in records:
        if s.headers.get("traceparent"):
            parts = s.headers["traceparent"].decode("ascii", "replace").split("-")
            if len(parts) == 4:
                return parts[1]
    return None


def _identity(r: Record) -> tuple[str | None, str | None, str | None, int | None]:
    """(tenant, priority, kind, created_at) as far as one record tells them."""
    if isinstance(r, GenerationRequest | FramesRendered):
        return r.tenant_id, r.priority, r.kind, epoch_ms(r.created_at)
    if isinstance(r, Completion):
        return r.tenant_id, None, None, epoch_ms(r.created_at)
    if isinstance(r, StatusEvent | DeadLetter):
        return r.tenant_id, None, None, None
    return None, None, None, None


def _identify(t: Timeline, records: list[Seen], row: Mapping[str, Any] | None) -> None:
    """Set who and what the request is: the first record that tells each, overruled by the row."""
    for s in records:
        tenant_id, priority, kind, created_at = _identity(s.record)
        t.tenant_id = t.tenant_id or tenant_id
        t.priority = t.priority or priority
        t.kind = t.kind or kind
        t.created_at = t.created_at or created_at
    if row is not None:
        t.tenant_id = row.get("tenant_id") or t.tenant_id
        t.priority = row.get("priority") or t.priority
        t.kind = row.get("kind") or t.kind
        t.created_at = epoch_ms(row.get("created_at")) or t.created_at


def _status_steps(
    t: Timeline, events: list[tuple[Seen, StatusEvent]], frames: list[FramesRendered]
) -> tuple[int | None, dict[str, StatusEvent]]:
    """Add the admitted, queued and assembling steps; returns (when the last frame was rendered, as of
    assembling; the first RUNNING event of each task)."""
    last_frame_at: int | None = None
    running: dict[str, StatusEvent] = {}
    for _, r in events:
        at = int(r.at)
        if r.state == "ACCEPTED":
            t.steps.append(Step(at, r.stage, "admitted", "ACCEPTED", wait_ms=_since(at, t.created_at)))
        elif r.state == "QUEUED":
            t.steps.append(Step(at, r.stage, "queued", r.message or ""))
        elif r.state == "RUNNING" and r.task_id:
            running.setdefault(r.task_id, r)  # the first progress event of each task
        elif r.state == "ASSEMBLING":
            finished = [epoch_ms(f.finished_at) or 0 for f in frames]
            last_frame_at = max(finished, default=0) or None
            t.steps.append(
                Step(at, r.stage, "assembling", "all frames in", wait_ms=_since(at, last_frame_at))
            )
    return last_frame_at, running


def _task_steps(t: Timeline, rendered: dict[str, FramesRendered], running: dict[str, StatusEvent]) -> None:
    """Add one line per render task, and its started and finished steps."""
    for task_id in sorted(set(rendered) | set(running)):
        t.tasks.append(_task_line(task_id, rendered.get(task_id), running.get(task_id)))
    for line in t.tasks:
        who = f"{line.worker_id or '?'}, batch of {line.batch_size}, attempt {line.attempt}"
        if line.started_at is not None:
            t.steps.append(
                Step(line.started_at, "renderer", f"task {line.task_id} started", who, wait_ms=line.wait_ms)
            )
        if line.finished_at is not None:
            t.steps.append(
                Step(
                    line.finished_at,
                    "renderer",
                    f"task {line.task_id} {line.outcome.lower()}",
                    f"frames {line.frames}",
                    work_ms=line.work_ms,
                )
            )


def _failure_steps(t: Timeline, family: dict[str, list[Seen]]) -> None:
    """Add a step per retry scheduled and per dead letter, and count them."""
    for _, retry in _of(family.get("retry", []), RetryEnvelope):
        t.retries += 1
        delay = retry.due_at - retry.last_failed_at
        detail = f"{retry.error_code}: {retry.error_message} (attempt {retry.attempts}, again in {delay} ms)"
        t.steps.append(Step(int(retry.last_failed_at), str(retry.stage), "retry scheduled", detail))
    for s, dead in _of(family.get("dlq", []), DeadLetter):
        t.dead_letters += 1
        detail = f"{dead.error_code}: {dead.error_message} (after {dead.attempts} attempt(s)) on {s.topic}"
        t.steps.append(Step(int(dead.last_failed_at), str(dead.stage), "dead-lettered", detail))


def _terminal_of(row: Mapping[str, Any] | None, completion: Completion | None) -> _Terminal | None:
    """How the request ended: its terminal row's word, else its Completion's; None while neither exists."""
    if row is not None:
        timings = {k: int(row[k]) for k in _TIMINGS if row.get(k) is not None}
        return _Terminal(
            str(row["status"]), row.get("reason_code"), timings, epoch_ms(row.get("finished_at"))
        )
    if completion is not None:
        timings = {k: int(v) for k, v in dataclasses.asdict(completion.timings).items()}
        return _Terminal(completion.status, completion.reason_code, timings, epoch_ms(completion.finished_at))
    return None


def _task_line(task_id: str, rendered: FramesRendered | None, running: StatusEvent | None) -> TaskLine:
    if rendered is None:
        assert running is not None
        return TaskLine(
            task_id, "RUNNING", running.worker_id, 0, 0, "?", None, int(running.at), None, None, None, None
        )
    r = rendered
    enqueued, started, finished = epoch_ms(r.enqueued_at), epoch_ms(r.started_at), epoch_ms(r.finished_at)
    return TaskLine(
        task_id,
        str(r.outcome),
        r.worker_id,
        int(r.attempt or 0),
        int(r.batch_size or 0),
        f"[{r.frame_start}, {r.frame_end})",
        enqueued,
        started,
        finished,
        _since(started, enqueued),
        _since(finished, started),
        r.render_ms,
    )


def render(t: Timeline, console: Console) -> None:
    """Print the timeline for a person: a summary, the steps (times from creation) and the render tasks."""
    head = f"[bold]{t.request_id}[/]  [bold]{t.status}[/]" + (f" {t.reason}" if t.reason else "")
    facts = [f"tenant {t.tenant_id or '?'}", (t.kind or "?").lower(), t.priority or "?"]
    if t.trace_id:
        facts.append(f"trace {t.trace_id}")
    console.print(head + "  " + escape(", ".join(facts)))
    if t.timings:
        parts = ", ".join(f"{k.removesuffix('_ms')} {v}" for k, v in t.timings.items() if k != "total_ms")
        console.print(f"total {t.timings.get('total_ms', '?')} ms ({parts})")
    if not t.steps:
        console.print("nothing recorded for this request in the window searched")
        return
    origin = t.created_at if t.created_at is not None else t.steps[0].at_ms
    steps = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name, justify in (("+ms", "right"), ("stage", "left"), ("step", "left"), ("wait", "right"),
                          ("work", "right"), ("detail", "left")):  # fmt: skip
        steps.add_column(name, justify=justify)  # type: ignore[arg-type]
    for s in t.steps:
        steps.add_row(
            str(s.at_ms - origin), s.stage, s.event, _dur(s.wait_ms), _dur(s.work_ms), escape(s.detail)
        )
    console.print(steps)
    if t.tasks:
        tasks = Table(title="render tasks", box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
        for name in ("task", "outcome", "worker", "batch", "attempt", "frames", "enqueued +ms", "wait",
                     "work", "render"):  # fmt: skip
            tasks.add_column(name)
        for line in t.tasks:
            enqueued = str(line.enqueued_at - origin) if line.enqueued_at is not None else ""
            cells = (
                line.task_id,
                line.outcome,
                line.worker_id or "",
                str(line.batch_size),
                str(line.attempt),
            )
            times = (enqueued, _dur(line.wait_ms), _dur(line.work_ms), _dur(line.render_ms))
            tasks.add_row(*cells, escape(line.frames), *times)
        console.print(tasks)
    console.print(f"retries {t.retries}, dead letters {t.dead_letters}")


def _dur(ms: int | None) -> str:
    return "" if ms is None else f"{ms} ms"
