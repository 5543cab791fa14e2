"""A request's timeline, built from the pipeline's own records (no tracing backend): `aigc trace`.

Input: the records that name one request, as `producers.request_log` reads them: the GenerationRequest,
status events, render outcomes (FramesRendered), decisions, completions, retry envelopes and dead
letters from Kafka, and the terminal row from Cassandra. Output: a `Timeline` of steps in time order
(created, admitted, each render task started and finished, assembling, the terminal state, every retry
and dead letter), each with the wait before it or the work it took, and one line per render task.
Pure: no I/O, so it is tested on recorded events.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

# Topic families the timeline reads, and the record each holds.
FAMILIES = {
    "requests": "GenerationRequest",
    "status": "StatusEvent",
    "frames": "FramesRendered",
    "decisions": "Completion",
    "completions": "Completion",
    "retry": "RetryEnvelope",
    "dlq": "DeadLetter",
}
# Stage order for steps at the same millisecond.
_ORDER = {"producer": 0, "gatekeeper": 1, "renderer": 2, "relay": 3, "assembler": 4, "dlq": 5}


@dataclass(frozen=True)
class Seen:
    """One record found on a topic of ``family`` (one of `FAMILIES`), with its Kafka coordinates."""

    family: str
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    record: Mapping[str, Any]
    headers: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    at_ms: int
    stage: str
    event: str
    detail: str = ""
    wait_ms: int | None = None  # time spent waiting before this step (queued, waiting for frames)
    work_ms: int | None = None  # time spent working, ending at this step


@dataclass(frozen=True)
class TaskLine:
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
        return sorted({s.stage for s in self.steps}, key=lambda s: _ORDER.get(s, 9))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "stages": self.stages}


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


def build(request_id: str, seen: Iterable[Seen], row: Mapping[str, Any] | None = None) -> Timeline:
    """The timeline of ``request_id`` from the records found for it and its terminal row (if any)."""
    t = Timeline(request_id)
    records = sorted(seen, key=lambda s: (s.timestamp_ms, s.topic, s.offset))
    family: dict[str, list[Seen]] = {}
    for s in records:
        family.setdefault(s.family, []).append(s)
        if t.trace_id is None and s.headers.get("traceparent"):
            parts = s.headers["traceparent"].decode("ascii", "replace").split("-")
            t.trace_id = parts[1] if len(parts) == 4 else None
    for s in records:
        r = s.record
        t.tenant_id = t.tenant_id or r.get("tenant_id")
        t.priority = t.priority or r.get("priority")
        t.kind = t.kind or r.get("kind")
        t.created_at = t.created_at or epoch_ms(r.get("created_at"))
    if row is not None:
        t.tenant_id = row.get("tenant_id") or t.tenant_id
        t.priority = row.get("priority") or t.priority
        t.kind = row.get("kind") or t.kind
        t.created_at = epoch_ms(row.get("created_at")) or t.created_at

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
    last_frame_at: int | None = None
    running: dict[str, Seen] = {}
    for s in family.get("status", []):
        r = s.record
        at = int(r["at"])
        if r["state"] == "ACCEPTED":
            steps.append(Step(at, r["stage"], "admitted", "ACCEPTED", wait_ms=_since(at, t.created_at)))
        elif r["state"] == "QUEUED":
            steps.append(Step(at, r["stage"], "queued", r.get("message") or ""))
        elif r["state"] == "RUNNING" and r.get("task_id"):
            running.setdefault(str(r["task_id"]), s)  # the first progress event of each task
        elif r["state"] == "ASSEMBLING":
            finished = [epoch_ms(f.record.get("finished_at")) or 0 for f in family.get("frames", [])]
            last_frame_at = max(finished, default=0) or None
            steps.append(
                Step(at, r["stage"], "assembling", "all frames in", wait_ms=_since(at, last_frame_at))
            )
    for s in family.get("decisions", []):
        r = s.record
        at = epoch_ms(r.get("finished_at")) or s.timestamp_ms
        detail = r["status"] + (
            f" {r['reason_code']}: {r.get('message') or ''}" if r.get("reason_code") else ""
        )
        steps.append(Step(at, "gatekeeper", "decided", detail, wait_ms=_since(at, t.created_at)))

    rendered = {str(s.record["task_id"]): s for s in family.get("frames", [])}
    for task_id in sorted(set(rendered) | set(running)):
        t.tasks.append(_task_line(task_id, rendered.get(task_id), running.get(task_id)))
    for line in t.tasks:
        who = f"{line.worker_id or '?'}, batch of {line.batch_size}, attempt {line.attempt}"
        if line.started_at is not None:
            steps.append(
                Step(line.started_at, "renderer", f"task {line.task_id} started", who, wait_ms=line.wait_ms)
            )
        if line.finished_at is not None:
            steps.append(
                Step(
                    line.finished_at,
                    "renderer",
                    f"task {line.task_id} {line.outcome.lower()}",
                    f"frames {line.frames}",
                    work_ms=line.work_ms,
                )
            )

    for s in family.get("retry", []):
        r = s.record
        t.retries += 1
        delay = r["due_at"] - r["last_failed_at"]
        detail = f"{r['error_code']}: {r['error_message']} (attempt {r['attempts']}, again in {delay} ms)"
        steps.append(Step(int(r["last_failed_at"]), str(r["stage"]), "retry scheduled", detail))
    for s in family.get("dlq", []):
        r = s.record
        t.dead_letters += 1
        detail = f"{r['error_code']}: {r['error_message']} (after {r['attempts']} attempt(s)) on {s.topic}"
        steps.append(Step(int(r["last_failed_at"]), str(r["stage"]), "dead-lettered", detail))

    completion_seen = next(iter(family.get("completions", [])), None)
    completion = completion_seen.record if completion_seen is not None else None
    terminal: Mapping[str, Any] | None = row
    if terminal is None and completion is not None:
        terminal = {**completion, **completion.get("timings", {})}
    if terminal is not None:
        t.status = str(terminal["status"])
        t.reason = terminal.get("reason_code")
        t.timings = {
            k: int(terminal[k])
            for k in ("queued_ms", "render_ms", "assemble_ms", "total_ms")
            if terminal.get(k) is not None
        }
        finished_at = epoch_ms(terminal.get("finished_at")) or (
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


def _task_line(task_id: str, rendered: Seen | None, running: Seen | None) -> TaskLine:
    if rendered is None:
        assert running is not None
        r = running.record
        return TaskLine(
            task_id, "RUNNING", r.get("worker_id"), 0, 0, "?", None, int(r["at"]), None, None, None, None
        )
    r = rendered.record
    enqueued, started, finished = (
        epoch_ms(r.get("enqueued_at")),
        epoch_ms(r.get("started_at")),
        epoch_ms(r.get("finished_at")),
    )
    return TaskLine(
        task_id,
        str(r["outcome"]),
        r.get("worker_id"),
        int(r.get("attempt") or 0),
        int(r.get("batch_size") or 0),
        f"[{r['frame_start']}, {r['frame_end']})",
        enqueued,
        started,
        finished,
        _since(started, enqueued),
        _since(finished, started),
        r.get("render_ms"),
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
