"""The device loop: picks micro-batches, renders them on a backend, preempts at denoising-step granularity.

One thread owns the device. It asks the `Scheduler` for the next batch and renders it; the backend
calls a step hook between denoising steps. In that hook the loop reports progress, honours
cancellation (the batch stops when all of its tasks are cancelled), and, when a more urgent class is
waiting (`Scheduler.should_preempt`), renders the urgent batch right there, nested inside the
suspended batch's hook, on the same thread. The suspended batch keeps its latents and scheduler
position on the call stack untouched, so when the hook returns it resumes exactly where it stopped
and produces the same frames it would have produced without the interruption. A nested pick only
takes classes above the running one, so at most one batch per class is on the stack (three deep).

The loop talks to three small parts: ``backend_for`` (a model's loaded backend), `TaskChecks` (is a
task cancelled or past its deadline) and `Outcomes` (where rendered, skipped and failed batches and
progress go: the renderer's `Outbox`, whose thread pool uploads frames, so the device moves straight on).
A CUDA out-of-memory splits the batch in halves and retries them.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from gpu_consumers.backends.base import Backend, RenderBatch, RenderOOM, StepHook
from gpu_consumers.metrics import renderer_metrics
from gpu_consumers.scheduler import Pick, Scheduler
from gpu_consumers.tasks import Task
from plumbing.clock import now_ms
from plumbing.errors import PermanentError, RetryableError
from schemas.records import TaskOutcome

log = logging.getLogger(__name__)


class BatchCancelled(Exception):
    """Every task of the running batch was cancelled: stop denoising it."""


class BatchAbandoned(Exception):
    """The renderer is shutting down and its grace period ran out: leave the batch unfinished."""


class RenderFailed(PermanentError):
    """The backend raised on this batch: the same inputs would fail again (dead-letter them)."""

    code = "RENDER_FAILED"


# Errors that mean the device itself is broken, not the batch: the process must restart.
_DEVICE_FAULTS = ("CUDA error", "device-side assert", "CUBLAS_STATUS", "cuDNN error", "NCCL error")


@dataclass
class Rendered:
    """A finished batch, handed to the publisher."""

    pick: Pick
    frames: list[np.ndarray]  # in task order, each task's frames consecutive
    started_at_ms: int
    render_s: float  # device time of this batch, excluding time it spent suspended
    batch_frames: int


class TaskChecks(Protocol):
    """Questions the loop asks about a task before and while rendering it."""

    def skip_reason(self, task: Task) -> TaskOutcome | None:
        """CANCELLED or EXPIRED when the task must not be rendered, else None."""

    def is_cancelled(self, task: Task) -> bool:
        """True once the task's owner cancelled it (asked between denoising steps)."""


class Outcomes(Protocol):
    """Where the loop's results go (called on the device thread; must not block on the device)."""

    def rendered(self, rendered: Rendered) -> None:
        """A batch finished: publish its frames."""

    def skipped(self, task: Task, outcome: TaskOutcome) -> None:
        """A task was not rendered (CANCELLED, EXPIRED): answer it."""

    def failed(self, pick: Pick, exc: BaseException) -> None:
        """A batch failed: route its tasks (retry, dead letter, or later again)."""

    def progress(self, pick: Pick, done: int, total: int) -> None:
        """``done`` of ``total`` frame-steps of a batch are rendered."""


@dataclass
class _Run:
    pick: Pick
    started: float
    suspended_s: float = 0.0
    last_progress: float = field(default=0.0)


class DeviceLoop:
    """The thread that owns the device: pick a batch, render it, hand the result to `Outcomes`."""

    def __init__(
        self,
        scheduler: Scheduler,
        lock: threading.Condition,
        backend_for: Callable[[str], Backend],
        checks: TaskChecks,
        outcomes: Outcomes,
        max_frames: int,
        progress_interval_s: float = 0.5,
    ) -> None:
        self.scheduler = scheduler
        self.lock = lock  # guards the scheduler; notified when tasks arrive
        self.backend_for = backend_for
        self.checks = checks
        self.outcomes = outcomes
        self.max_frames = max_frames
        self.progress_interval_s = progress_interval_s
        self.busy_s = 0.0  # device time spent rendering, for the busy fraction
        self.depth = 0
        self.max_depth_seen = 0
        self.crashed: BaseException | None = None
        self.abandon = threading.Event()  # set at shutdown once the grace period is over
        self.metrics = renderer_metrics()

    def run(self, stop: threading.Event) -> None:
        """Render until ``stop``; an unexpected error stops the loop loudly (``crashed``), never silently."""
        try:
            while not stop.is_set():
                pick = self._next(stop)
                if pick is not None:
                    self._render(pick)
        except BaseException as exc:
            self.crashed = exc
            log.critical("the device loop crashed", exc_info=True)
            stop.set()
            raise

    def _next(self, stop: threading.Event, above: str | None = None) -> Pick | None:
        while not stop.is_set():
            with self.lock:
                pick = self.scheduler.pick(self.max_frames, above=above)
                if pick is None:
                    if above is not None:
                        return None
                    self.lock.wait(self.scheduler.wait_hint() or 0.05)
                    continue
            # Outside the lock: answering a skipped task produces to Kafka, which may have to wait for
            # the main thread, and the main thread takes this lock to feed the scheduler.
            kept = self._drop_skipped(pick)
            if kept is not None or above is not None:
                return kept
        return None

    def _drop_skipped(self, pick: Pick) -> Pick | None:
        """Answer expired and cancelled tasks without rendering them."""
        keep = []
        for task in pick.tasks:
            reason = self.checks.skip_reason(task)
            if reason is None:
                keep.append(task)
            else:
                self.outcomes.skipped(task, reason)
        if not keep:
            return None
        return dataclasses.replace(pick, tasks=keep)

    def _render(self, pick: Pick) -> None:
        started = time.monotonic()
        run = _Run(pick, started, last_progress=started)
        started_at_ms = now_ms()
        self.depth += 1
        self.max_depth_seen = max(self.max_depth_seen, self.depth)
        self.metrics.batch_started(pick.tasks, pick.frames)
        try:
            frames = self._render_split(pick, run)
        except BatchCancelled:
            for task in pick.tasks:
                self.outcomes.skipped(task, "CANCELLED")
            return
        except BatchAbandoned:
            # Handed back: nothing is published, so the tasks stay unacknowledged and another renderer
            # (or this one, restarted) renders these tasks again.
            log.info("abandoned a batch of %d task(s) at shutdown", len(pick.tasks))
            if self.depth > 1:
                raise
            return
        except Exception as exc:  # the renderer routes it (retry or dead letter) by its class
            log.exception("batch of %d task(s) failed", len(pick.tasks))
            self.outcomes.failed(pick, exc)
            return
        finally:
            self.depth -= 1
            self.metrics.batch_ended()
            elapsed = time.monotonic() - run.started - run.suspended_s
            self.busy_s += elapsed
        self.outcomes.rendered(Rendered(pick, frames, started_at_ms, elapsed, pick.frames))

    def _render_split(self, pick: Pick, run: _Run) -> list[np.ndarray]:
        tasks = pick.tasks
        key = tasks[0].key
        specs = [spec for task in tasks for spec in task.frames()]
        backend = self.backend_for(key.model)
        chunk = max(1, min(len(specs), backend.max_batch()))
        frames: list[np.ndarray] = []
        start = 0
        while start < len(specs):
            part = specs[start : start + chunk]
            batch = RenderBatch(
                key.model, key.width, key.height, key.steps, key.guidance_scale, key.scheduler, tuple(part)
            )
            try:
                hook = self._hook(run, start * key.steps, len(part) * key.steps, len(specs) * key.steps)
                frames += backend.render(batch, hook)
            except RenderOOM as exc:
                if chunk == 1:
                    raise RetryableError(
                        "out of device memory even for one frame", code="DEVICE_OOM"
                    ) from exc
                chunk = max(1, chunk // 2)
                self.metrics.oom_split()
                log.warning("out of device memory: splitting the batch into chunks of %d", chunk)
                continue
            except (BatchCancelled, BatchAbandoned):
                raise
            except Exception as exc:
                if any(fault in str(exc) for fault in _DEVICE_FAULTS):
                    raise  # the device is broken, not the batch: the process restarts (classify: unknown)
                raise RenderFailed(f"{type(exc).__name__}: {exc}"[:1000]) from exc
            start += len(part)
        return frames

    def _hook(self, run: _Run, done_before: int, chunk_units: int, batch_units: int) -> StepHook:
        """The step hook of one backend call; progress counts frame-steps of the whole batch (the
        backend's own step count may differ from the task's, e.g. a synthetic backend's)."""
        last_step = [time.monotonic()]  # when the previous step ended (or the call began)

        def on_step(done: int, total: int) -> None:
            now = time.monotonic()
            self.metrics.step(now - last_step[0])
            # A render shorter than the interval reports nothing: its FramesRendered follows at once.
            if now - run.last_progress >= self.progress_interval_s:
                run.last_progress = now
                self.outcomes.progress(run.pick, done_before + round(chunk_units * done / total), batch_units)
            if self.abandon.is_set():
                raise BatchAbandoned
            if all(self.checks.is_cancelled(task) for task in run.pick.tasks):
                raise BatchCancelled
            if done < total:
                self._preempt(run)
            last_step[0] = time.monotonic()

        return on_step

    def _preempt(self, run: _Run) -> None:
        """Render more urgent batches nested here, while ``run`` stays suspended between two steps."""
        while True:
            with self.lock:
                if not self.scheduler.should_preempt(run.pick):
                    return
            urgent = self._next(threading.Event(), above=run.pick.cls)
            if urgent is None:
                return
            suspended = time.monotonic()
            self.metrics.preempted()
            self._render(urgent)
            run.suspended_s += time.monotonic() - suspended


def task_slices(tasks: Sequence[Task]) -> list[tuple[Task, int, int]]:
    """Each task with the [start, end) slice of a batch's frames that belongs to it."""
    out = []
    start = 0
    for task in tasks:
        out.append((task, start, start + task.frame_count))
        start += task.frame_count
    return out
