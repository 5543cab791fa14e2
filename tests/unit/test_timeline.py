"""`aigc trace`'s timeline from recorded events (no I/O), and the topic names it reads on either layout."""

from __future__ import annotations

import io
import itertools
from datetime import UTC, datetime
from typing import Any

from rich.console import Console

from plumbing.settings import Settings
from producers.request_log import topic_families
from producers.timeline import Seen, build, render
from schemas.records import (
    Completion,
    DeadLetter,
    FramesRendered,
    GenerationRequest,
    Record,
    RetryEnvelope,
    StatusEvent,
    Timings,
)

T0 = 1_760_000_000_000
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
HEADERS = {"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01".encode(), "request_id": b"r1"}


OFFSETS = itertools.count()


def seen(family: str, at: int, record: Record, topic: str | None = None) -> Seen:
    return Seen(family, topic or f"aigc.{family}", 0, next(OFFSETS), at, record, HEADERS)


def status(state: str, at: int, stage: str, **extra: Any) -> Seen:
    record = StatusEvent(request_id="r1", tenant_id="acme", stage=stage, state=state, at=at, **extra)
    return seen("status", at, record)


def frames(task: str, start: int, enqueued: int, started: int, finished: int, attempt: int = 0) -> Seen:
    record = FramesRendered(
        request_id="r1", tenant_id="acme", task_id=task, outcome="RENDERED", kind="VIDEO",
        priority="HIGH", frame_start=start, frame_end=start + 4, frame_count=8, width=64, height=64,
        output_format="MP4", created_at=T0, accepted_at=T0 + 20, enqueued_at=enqueued, started_at=started,
        finished_at=finished, render_ms=finished - started, batch_size=4, worker_id="w-1", attempt=attempt,
    )  # fmt: skip
    return seen("frames", finished, record)


def completion(request_id: str, status: str, **fields: Any) -> Completion:
    return Completion(
        request_id=request_id, tenant_id="acme", status=status, timings=Timings(), finished_at=0, **fields
    )


def video_records() -> list[Seen]:
    retry = RetryEnvelope(
        original_topic="aigc.render.default.high", original_partition=0, original_offset=7,
        stage="renderer", error_kind="RetryableError", error_code="CUDA_OOM", error_message="out of memory",
        attempts=1, first_failed_at=T0 + 300, last_failed_at=T0 + 300, due_at=T0 + 1300,
    )  # fmt: skip
    request = GenerationRequest(
        request_id="r1", tenant_id="acme", created_at=T0, priority="HIGH", kind="VIDEO", prompt="waves",
        model="tiny-sd", width=64, height=64, steps=4, guidance_scale=7.5,
    )  # fmt: skip
    return [
        seen("requests", T0 + 5, request),
        status("ACCEPTED", T0 + 20, "gatekeeper"),
        status("QUEUED", T0 + 20, "gatekeeper", message="2 task(s) on aigc.render.default.high"),
        status("RUNNING", T0 + 60, "renderer", task_id="r1-0", worker_id="w-1"),
        seen("retry", T0 + 300, retry, "aigc.retry.renderer.1s"),
        frames("r1-0", 0, T0 + 20, T0 + 50, T0 + 250),
        frames("r1-1", 4, T0 + 20, T0 + 1400, T0 + 1700, attempt=1),
        status("ASSEMBLING", T0 + 1750, "assembler"),
        seen("completions", T0 + 1900, completion("r1", "SUCCEEDED")),
    ]


def row() -> dict[str, Any]:
    return {
        "request_id": "r1", "tenant_id": "acme", "kind": "VIDEO", "priority": "HIGH", "status": "SUCCEEDED",
        "reason_code": None, "queued_ms": 30, "render_ms": 500, "assemble_ms": 200, "total_ms": 1900,
        "created_at": datetime.fromtimestamp(T0 / 1000, UTC).replace(tzinfo=None),  # as Cassandra gives it
        "finished_at": datetime.fromtimestamp((T0 + 1900) / 1000, UTC).replace(tzinfo=None),
    }  # fmt: skip


def test_a_video_timeline_names_each_stage_task_wait_and_work_in_order() -> None:
    t = build("r1", reversed(video_records()), row())
    assert (t.status, t.tenant_id, t.priority, t.kind, t.trace_id) == (
        "SUCCEEDED",
        "acme",
        "HIGH",
        "VIDEO",
        TRACE,
    )
    assert t.created_at == T0
    events = [(s.at_ms - T0, s.stage, s.event) for s in t.steps]
    assert events == [
        (0, "producer", "created"),
        (5, "producer", "submitted"),
        (20, "gatekeeper", "admitted"),
        (20, "gatekeeper", "queued"),
        (50, "renderer", "task r1-0 started"),
        (250, "renderer", "task r1-0 rendered"),
        (300, "renderer", "retry scheduled"),
        (1400, "renderer", "task r1-1 started"),
        (1700, "renderer", "task r1-1 rendered"),
        (1750, "assembler", "assembling"),
        (1900, "assembler", "completed"),
    ]
    by_event = {s.event: s for s in t.steps}
    assert by_event["admitted"].wait_ms == 20
    assert by_event["task r1-1 started"].wait_ms == 1380  # enqueued at +20, started at +1400
    assert by_event["task r1-0 rendered"].work_ms == 200
    assert by_event["assembling"].wait_ms == 50  # after the last frame
    assert by_event["completed"].work_ms == 200
    assert "CUDA_OOM" in by_event["retry scheduled"].detail
    assert t.timings == {"queued_ms": 30, "render_ms": 500, "assemble_ms": 200, "total_ms": 1900}
    assert [(x.task_id, x.attempt, x.worker_id, x.batch_size) for x in t.tasks] == [
        ("r1-0", 0, "w-1", 4),
        ("r1-1", 1, "w-1", 4),
    ]
    assert (t.retries, t.dead_letters) == (1, 0)
    assert t.stages == ["producer", "gatekeeper", "renderer", "assembler"]


def test_without_a_row_the_completion_on_the_topic_is_the_terminal_state() -> None:
    t = build("r1", video_records())
    assert t.status == "SUCCEEDED" and t.steps[-1].event == "completed"


def test_a_request_still_rendering_is_in_progress_with_its_running_task() -> None:
    records = [
        r
        for r in video_records()
        if r.family == "requests" or (isinstance(r.record, StatusEvent) and r.record.state != "ASSEMBLING")
    ]
    t = build("r1", records)
    assert t.status == "IN_PROGRESS"
    [task] = t.tasks
    assert (task.task_id, task.outcome, task.started_at) == ("r1-0", "RUNNING", T0 + 60)


def test_a_rejection_and_a_dead_letter() -> None:
    decision = Completion(
        request_id="r2", tenant_id="acme", status="REJECTED", reason_code="MODERATION_BLOCKED",
        message="blocked", finished_at=T0 + 15, created_at=T0, timings=Timings(),
    )  # fmt: skip
    dead = DeadLetter(
        original_topic="aigc.frames.normal", original_partition=0, original_offset=3, stage="assembler",
        error_kind="PermanentError", error_code="UNDECODABLE_FRAME", error_message="not an image",
        attempts=1, first_failed_at=T0 + 40, last_failed_at=T0 + 40,
    )  # fmt: skip
    t = build("r2", [seen("decisions", T0 + 15, decision), seen("dlq", T0 + 40, dead, "aigc.dlq.assembler")])
    assert [s.event for s in t.steps] == ["created", "decided", "dead-lettered"]
    assert "MODERATION_BLOCKED" in t.steps[1].detail and t.steps[1].wait_ms == 15
    assert t.dead_letters == 1 and t.status == "DEAD_LETTERED"


def test_nothing_found_is_unknown_and_says_so() -> None:
    t = build("nope", [])
    assert (t.status, t.steps) == ("UNKNOWN", [])
    out = io.StringIO()
    render(t, Console(file=out, width=120))
    assert "nothing recorded" in out.getvalue()


def test_render_prints_every_step_and_task_and_json_is_plain_data() -> None:
    t = build("r1", video_records(), row())
    out = io.StringIO()
    render(t, Console(file=out, width=160))
    text = out.getvalue()
    for word in ("SUCCEEDED", TRACE, "admitted", "task r1-1 started", "retry scheduled", "assembling",
                 "completed", "render tasks", "retries 1, dead letters 0", "[4, 8)"):  # fmt: skip
        assert word in text, word
    data = t.to_json()
    assert data["stages"] == ["producer", "gatekeeper", "renderer", "assembler"]
    assert data["steps"][0]["event"] == "created"


def test_every_topic_the_timeline_reads_has_its_family() -> None:
    settings = Settings()
    families = topic_families(settings)
    assert families["aigc.frames.high"] == "frames" and families["aigc.decisions.low"] == "decisions"
    assert families["aigc.status"] == "status" and families["aigc.dlq.renderer"] == "dlq"
    assert families["aigc.requests.high"] == "requests"
    assert {f for f in families.values()} == {
        "requests",
        "frames",
        "decisions",
        "status",
        "completions",
        "retry",
        "dlq",
    }
