"""The device loop (`DeviceLoop`) on a thread, with the real scheduler and the synthetic backend: priority
order, preemption between denoising steps, cancellation, skipping, out-of-memory splits, nesting depth."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from gpu_consumers.backends.base import Backend, RenderBatch, RenderOOM, StepHook
from gpu_consumers.backends.synthetic import SyntheticBackend, draw_frame
from gpu_consumers.executor import DeviceLoop, Rendered, RenderFailed
from gpu_consumers.scheduler import Pick, Scheduler
from gpu_consumers.tasks import Task
from plumbing.errors import RetryableError
from schemas.records import LatentRecipe, RenderTask

WEIGHTS = {"HIGH": 16.0, "NORMAL": 4.0, "LOW": 1.0}
WAIT_S = 10.0  # how long a test waits for something the loop should do within a second
JOIN_S = 10.0
SIZE = 16
_ids = itertools.count()


def make_task(priority: str, frames: int = 1, steps: int = 2, model: str = "m", tenant: str = "t1") -> Task:
    n = next(_ids)
    record = RenderTask(
        task_id=f"r{n}.0",
        request_id=f"r{n}",
        tenant_id=tenant,
        priority=priority,
        kind="VIDEO" if frames > 1 else "IMAGE",
        pool="gpu",
        model=model,
        prompt=f"prompt {n}",
        prompt_end=None,
        negative_prompt=None,
        width=SIZE,
        height=SIZE,
        steps=steps,
        guidance_scale=7.5,
        scheduler=None,
        seed=n,
        frame_start=0,
        frame_end=frames,
        frame_count=frames,
        recipe=LatentRecipe(
            seed_start=1000 + n,
            seed_end=2000 + n,
            positions=[i / max(1, frames - 1) for i in range(frames)],
        ),
        output_format="MP4" if frames > 1 else "PNG",
        created_at=0,
        accepted_at=0,
        enqueued_at=0,
    )
    return Task(record, f"aigc.render.gpu.{priority.lower()}", 0, n, {}, time.monotonic())


def expected_frames(tasks: list[Task]) -> list[np.ndarray]:
    """The frames of ``tasks`` rendered alone, straight from the synthetic drawing."""
    return [draw_frame(spec, SIZE, SIZE) for task in tasks for spec in task.frames()]


def same_frames(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


class Checks:
    """`executor.TaskChecks` from two functions."""

    def __init__(self, skip: Callable[[Task], str | None], is_cancelled: Callable[[Task], bool]) -> None:
        self.skip_reason = skip
        self.is_cancelled = is_cancelled


class Outcomes:
    """`executor.Outcomes` that records into a `Harness`."""

    def __init__(self, harness: Harness) -> None:
        self.rendered = harness._publish
        self.skipped = harness._skipped
        self.failed = harness._failed
        self.progress = harness._progress


class Harness:
    """A DeviceLoop on its own thread, with outcomes recorded as they happen."""

    def __init__(
        self,
        backends: dict[str, Backend],
        max_frames: int = 8,
        skip: Callable[[Task], str | None] = lambda task: None,
        is_cancelled: Callable[[Task], bool] = lambda task: False,
    ) -> None:
        self.lock = threading.Condition()
        self.scheduler = Scheduler(WEIGHTS, aging_s=60.0, batch_wait_s=0.0)
        self.changed = threading.Condition()
        self.published: list[Rendered] = []
        self.published_wall_s: list[float] = []
        self.skipped: list[tuple[Task, str]] = []
        self.progress: list[tuple[str, int, int]] = []
        self.failed: list[tuple[Pick, BaseException]] = []
        self.first_step = {cls: threading.Event() for cls in WEIGHTS}
        self.loop = DeviceLoop(
            self.scheduler,
            self.lock,
            lambda model: backends[model],
            Checks(skip, is_cancelled),
            Outcomes(self),
            max_frames,
            progress_interval_s=0.0,
        )
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop.run, args=(self.stop,), daemon=True)

    def _publish(self, rendered: Rendered) -> None:
        with self.changed:
            self.published.append(rendered)
            self.published_wall_s.append(time.time())
            self.changed.notify_all()

    def _skipped(self, task: Task, reason: str) -> None:
        with self.changed:
            self.skipped.append((task, reason))
            self.changed.notify_all()

    def _progress(self, pick: Pick, done: int, total: int) -> None:
        with self.changed:
            self.progress.append((pick.cls, done, total))
            self.changed.notify_all()
        self.first_step[pick.cls].set()

    def _failed(self, pick: Pick, exc: BaseException) -> None:
        with self.changed:
            self.failed.append((pick, exc))
            self.changed.notify_all()

    def add(self, *tasks: Task) -> None:
        with self.lock:
            for task in tasks:
                self.scheduler.add(task)
            self.lock.notify_all()

    def start(self) -> Harness:
        self.thread.start()
        return self

    def wait_until(self, predicate: Callable[[], bool]) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, timeout=WAIT_S), "the device loop did not get there"

    def close(self) -> None:
        self.stop.set()
        with self.lock:
            self.lock.notify_all()
        if self.thread.is_alive():
            self.thread.join(JOIN_S)
            assert not self.thread.is_alive(), "the device loop did not stop"


@pytest.fixture
def harness() -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(*args: Any, **kwargs: Any) -> Harness:
        made.append(Harness(*args, **kwargs))
        return made[-1]

    yield make
    for h in made:
        h.close()


class CountingBackend:
    """Wraps a backend and records the size of every render call."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls: list[int] = []

    def render(self, batch: RenderBatch, on_step: StepHook | None = None) -> list[np.ndarray]:
        self.calls.append(len(batch.frames))
        return self.inner.render(batch, on_step)

    def max_batch(self) -> int:
        return self.inner.max_batch()


class SmallMemoryBackend:
    """Runs out of device memory for batches of more than ``limit`` frames."""

    name = "small-memory"

    def __init__(self, limit: int = 2, max_batch: int = 8) -> None:
        self.limit = limit
        self._max_batch = max_batch
        self.calls: list[int] = []

    def render(self, batch: RenderBatch, on_step: StepHook | None = None) -> list[np.ndarray]:
        self.calls.append(len(batch.frames))
        if len(batch.frames) > self.limit:
            if on_step is not None:
                on_step(1, batch.steps)  # it fails part-way, after a step, like a real OOM
            raise RenderOOM(f"{len(batch.frames)} frames do not fit")
        for done in range(1, batch.steps + 1):
            if on_step is not None:
                on_step(done, batch.steps)
        return [draw_frame(spec, batch.width, batch.height) for spec in batch.frames]

    def max_batch(self) -> int:
        return self._max_batch


# -- order ------------------------------------------------------------------------------------------


def test_batches_are_rendered_and_published_in_priority_order(harness: Callable[..., Harness]) -> None:
    h = harness({"m": SyntheticBackend(5.0)})
    tasks = {cls: [make_task(cls), make_task(cls, frames=2)] for cls in ("LOW", "NORMAL", "HIGH")}
    h.add(*tasks["LOW"], *tasks["NORMAL"], *tasks["HIGH"])
    h.start()
    h.wait_until(lambda: len(h.published) == 3)
    assert [r.pick.cls for r in h.published] == ["HIGH", "NORMAL", "LOW"]
    for rendered in h.published:
        assert rendered.pick.tasks == tasks[rendered.pick.cls]  # one batch per class
        assert rendered.batch_frames == 3
        assert same_frames(rendered.frames, expected_frames(tasks[rendered.pick.cls]))
        assert rendered.render_s > 0
    assert (h.skipped, h.failed) == ([], [])
    assert h.loop.max_depth_seen == 1
    # Progress counts frame-steps of the whole batch, and reaches the end.
    assert ("HIGH", 6, 6) in h.progress


# -- preemption -------------------------------------------------------------------------------------


def test_a_high_task_preempts_a_running_low_batch_between_steps(harness: Callable[..., Harness]) -> None:
    low_steps = 10
    low_backend = SyntheticBackend(200.0)  # 2 frames x 200 ms over 10 steps: 40 ms a step
    step_s = low_backend.batch_cost_ms(2) / low_steps / 1000
    high_backend = SyntheticBackend(100.0)
    h = harness({"slow": low_backend, "fast": high_backend})
    low = [make_task("LOW", frames=2, steps=low_steps, model="slow")]
    high = make_task("HIGH", steps=2, model="fast")
    h.add(*low)
    h.start()
    assert h.first_step["LOW"].wait(WAIT_S)
    enqueued_ms = time.time_ns() // 1_000_000
    h.add(high)
    h.wait_until(lambda: len(h.published) == 2)
    first, second = h.published
    # The HIGH batch was published while the LOW batch was suspended, before it finished.
    assert (first.pick.cls, second.pick.cls) == ("HIGH", "LOW")
    assert first.pick.tasks == [high]
    classes = [cls for cls, _, _ in h.progress]
    low_end = h.progress.index(("LOW", 2 * low_steps, 2 * low_steps))
    assert 0 < classes.index("HIGH") < low_end  # HIGH ran between two LOW steps...
    assert low_end == len(h.progress) - 1  # ...and the LOW batch then ran to its end
    # It waited about one denoising step of the LOW batch, not the rest of it (generous bound).
    assert first.started_at_ms - enqueued_ms < 5 * step_s * 1000
    # The LOW batch resumed where it stopped: the same frames as rendered alone.
    assert same_frames(second.frames, expected_frames(low))
    assert same_frames(
        second.frames,
        low_backend.render(RenderBatch("slow", SIZE, SIZE, low_steps, 7.5, None, tuple(low[0].frames()))),
    )
    # The LOW batch's render time leaves out the time it spent suspended.
    low_wall_s = h.published_wall_s[1] - second.started_at_ms / 1000
    assert second.render_s < low_wall_s - first.render_s / 2
    assert h.loop.max_depth_seen == 2


def test_only_a_more_urgent_class_preempts(harness: Callable[..., Harness]) -> None:
    h = harness({"m": SyntheticBackend(40.0)})  # 2 frames over 8 steps: 10 ms a step
    running = make_task("NORMAL", frames=2, steps=8)
    h.add(running)
    h.start()
    assert h.first_step["NORMAL"].wait(WAIT_S)
    h.add(make_task("NORMAL", steps=8), make_task("LOW", steps=8))  # same class and less urgent
    h.wait_until(lambda: len(h.published) == 3)
    assert h.published[0].pick.tasks == [running]
    # Nothing else ran until the running batch's last step (afterwards the LOW batch may well be
    # preempted by the waiting NORMAL one: that is fair sharing at work).
    end = h.progress.index(("NORMAL", 16, 16))
    assert {cls for cls, _, _ in h.progress[:end]} == {"NORMAL"}
    assert all(done <= 16 and total == 16 for _, done, total in h.progress[:end])


def test_nesting_is_two_deep_with_two_classes(harness: Callable[..., Harness]) -> None:
    slow = SyntheticBackend(200.0)
    h = harness({"slow": slow, "fast": SyntheticBackend(10.0)})
    h.add(make_task("LOW", frames=1, steps=10, model="slow"))
    h.start()
    assert h.first_step["LOW"].wait(WAIT_S)
    for _ in range(3):
        h.add(make_task("HIGH", steps=2, model="fast"))
        time.sleep(0.02)
    # HIGH tasks that arrive together may share a batch: count tasks, not batches.
    h.wait_until(lambda: sum(len(r.pick.tasks) for r in h.published) == 4)
    assert h.published[-1].pick.cls == "LOW"
    assert h.loop.max_depth_seen == 2
    assert h.loop.depth == 0


def test_nesting_holds_at_most_one_batch_per_class(harness: Callable[..., Harness]) -> None:
    slow = SyntheticBackend(200.0)
    h = harness({"slow": slow, "fast": SyntheticBackend(10.0)})
    h.add(make_task("LOW", frames=1, steps=10, model="slow"))
    h.start()
    assert h.first_step["LOW"].wait(WAIT_S)
    h.add(make_task("NORMAL", frames=1, steps=10, model="slow"))
    assert h.first_step["NORMAL"].wait(WAIT_S)
    h.add(make_task("HIGH", steps=2, model="fast"))
    h.wait_until(lambda: len(h.published) == 3)
    assert [r.pick.cls for r in h.published] == ["HIGH", "NORMAL", "LOW"]
    assert h.loop.max_depth_seen == 3  # LOW, suspended by NORMAL, suspended by HIGH


# -- cancellation and skipping ----------------------------------------------------------------------


def test_a_batch_whose_tasks_are_all_cancelled_stops_mid_render(harness: Callable[..., Harness]) -> None:
    backend = CountingBackend(SyntheticBackend(20.0))  # 2 frames over 20 steps: 2 ms a step
    tasks = [make_task("HIGH", steps=20), make_task("HIGH", steps=20)]
    # Both tasks are cancelled once the third step is done (the owner cancels while it renders).
    made: list[Harness] = []
    h = harness({"m": backend}, is_cancelled=lambda task: len(made[0].progress) >= 3)
    made.append(h)
    h.add(*tasks)
    h.start()
    h.wait_until(lambda: len(h.skipped) == 2)
    assert sorted(h.skipped, key=lambda s: s[0].offset) == [(t, "CANCELLED") for t in tasks]
    assert h.published == []
    assert [done for _, done, _ in h.progress] == [2, 4, 6]  # stopped after the third of 20 steps
    assert backend.calls == [2]


def test_a_batch_with_some_tasks_cancelled_still_renders(harness: Callable[..., Harness]) -> None:
    tasks = [make_task("HIGH", steps=3), make_task("HIGH", steps=3)]
    h = harness({"m": SyntheticBackend(5.0)}, is_cancelled=lambda task: task is tasks[0])
    h.add(*tasks)
    h.start()
    h.wait_until(lambda: len(h.published) == 1)
    assert h.published[0].pick.tasks == tasks
    assert h.skipped == []


def test_a_skipped_task_is_answered_without_rendering(harness: Callable[..., Harness]) -> None:
    backend = CountingBackend(SyntheticBackend(5.0))
    expired, live, also_expired = make_task("NORMAL"), make_task("NORMAL"), make_task("NORMAL")
    expired_ids = {expired.request_id, also_expired.request_id}
    h = harness({"m": backend}, skip=lambda task: "EXPIRED" if task.request_id in expired_ids else None)
    h.add(expired)
    h.start()
    h.wait_until(lambda: len(h.skipped) == 1)
    assert h.skipped == [(expired, "EXPIRED")]
    assert backend.calls == []
    assert h.published == [] and h.progress == []
    # In a batch with an expired task, the others are rendered.
    h.add(live, also_expired)
    h.wait_until(lambda: len(h.published) == 1)
    assert h.published[0].pick.tasks == [live]
    assert same_frames(h.published[0].frames, expected_frames([live]))
    assert h.skipped[-1] == (also_expired, "EXPIRED")
    assert backend.calls == [1]


# -- out of memory ----------------------------------------------------------------------------------


def test_out_of_memory_splits_the_batch_and_still_publishes_every_frame(
    harness: Callable[..., Harness],
) -> None:
    backend = SmallMemoryBackend(limit=2, max_batch=8)
    tasks = [make_task("HIGH", frames=2) for _ in range(4)]
    h = harness({"m": backend}, max_frames=8)
    h.add(*tasks)
    h.start()
    h.wait_until(lambda: len(h.published) == 1)
    rendered = h.published[0]
    assert rendered.pick.tasks == tasks
    assert same_frames(rendered.frames, expected_frames(tasks))
    assert backend.calls == [8, 4, 2, 2, 2, 2]
    assert h.failed == []


def test_out_of_memory_for_a_single_frame_fails_the_batch(harness: Callable[..., Harness]) -> None:
    backend = SmallMemoryBackend(limit=0, max_batch=8)
    tasks = [make_task("HIGH"), make_task("HIGH")]
    h = harness({"m": backend})
    h.add(*tasks)
    h.start()
    h.wait_until(lambda: len(h.failed) == 1)
    pick, exc = h.failed[0]
    assert pick.tasks == tasks
    # Typed for the router: retryable (a smaller batch or a freer device may fit later), caused by the OOM.
    assert isinstance(exc, RetryableError) and exc.code == "DEVICE_OOM"
    assert isinstance(exc.__cause__, RenderOOM)
    assert backend.calls == [2, 1]
    assert h.published == []
    # The loop goes on with the next batch.
    backend.limit = 8
    h.add(make_task("HIGH"))
    h.wait_until(lambda: len(h.published) == 1)


def test_the_loop_stops_when_asked(harness: Callable[..., Harness]) -> None:
    h = harness({"m": SyntheticBackend(5.0)}).start()
    h.add(make_task("HIGH"))
    h.wait_until(lambda: len(h.published) == 1)
    h.close()
    assert not h.thread.is_alive()


class ExplodingBackend:
    """A backend that raises what a model raises on inputs it cannot handle."""

    name = "m"

    def __init__(self, message: str) -> None:
        self.message = message

    def max_batch(self) -> int:
        return 8

    def render(self, batch, on_step=None):  # type: ignore[no-untyped-def]
        raise RuntimeError(self.message)


def test_a_model_error_is_a_permanent_render_failure(harness: Callable[..., Harness]) -> None:
    h = harness({"m": ExplodingBackend("Expected size 64 but got size 72")})
    h.add(make_task("HIGH"))
    h.start()
    h.wait_until(lambda: len(h.failed) == 1)
    exc = h.failed[0][1]
    assert isinstance(exc, RenderFailed) and exc.code == "RENDER_FAILED" and "size 72" in str(exc)


def test_a_broken_device_is_not_blamed_on_the_batch(harness: Callable[..., Harness]) -> None:
    h = harness({"m": ExplodingBackend("CUDA error: an illegal memory access was encountered")})
    h.add(make_task("HIGH"))
    h.start()
    h.wait_until(lambda: len(h.failed) == 1)
    exc = h.failed[0][1]
    assert not isinstance(exc, RenderFailed)  # unknown to classify(): the renderer process restarts


def test_an_abandoned_batch_publishes_nothing(harness: Callable[..., Harness]) -> None:
    h = harness({"m": SyntheticBackend(400.0)})  # 400 ms over the task's steps
    h.add(make_task("LOW", steps=20))
    h.start()
    assert h.first_step["LOW"].wait(WAIT_S)
    h.loop.abandon.set()
    time.sleep(0.5)
    assert h.published == [] and h.failed == [] and h.skipped == []
