"""The renderer's metrics: what the device loop and the outbox report as they go.

- ``aigc_renderer_queue_wait_seconds{priority}``: a task's ``enqueued_at`` (set by the gatekeeper) to the
  start of the batch that renders it;
- ``aigc_renderer_step_seconds``: one denoising step of a batch (time spent suspended excluded);
- ``aigc_renderer_task_seconds{priority}``: render start to the task's frames uploaded and announced;
- ``aigc_renderer_batch_size``: frames per batch;
- ``aigc_renderer_busy_ratio``: the fraction of the last 10 s the device spent rendering (computed at
  scrape), and ``aigc_renderer_busy_seconds_total`` for ``rate()``;
- ``aigc_renderer_preemptions_total``, ``aigc_renderer_cancellations_total`` (tasks cancelled before or
  while rendering), ``aigc_renderer_oom_splits_total``, ``aigc_renderer_suspended_batches``;
- ``aigc_renderer_tasks_total{priority, outcome}``: rendered, cancelled, expired, retried, dead_lettered;
- ``aigc_renderer_device_memory_bytes``: CUDA memory allocated by torch, only where CUDA is in use.

Every call is cheap (a lock and an add) and does nothing while metrics are off.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from collections.abc import Iterable, Sequence

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from gpu_consumers.tasks import Task
from plumbing.clock import now_ms
from plumbing.observability import LATENCY_BUCKETS, enabled, priority_label

BUSY_WINDOW_S = 10.0

QUEUE_WAIT = Histogram(
    "aigc_renderer_queue_wait_seconds",
    "From a task's enqueued_at to the start of its render",
    ["priority"],
    buckets=LATENCY_BUCKETS,
)
STEP = Histogram(
    "aigc_renderer_step_seconds",
    "One denoising step of a batch, suspensions excluded",
    buckets=LATENCY_BUCKETS,
)
TASK = Histogram(
    "aigc_renderer_task_seconds",
    "From render start to the task's frames uploaded and announced",
    ["priority"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram("aigc_renderer_batch_size", "Frames per rendered batch", buckets=(1, 2, 4, 8, 16, 32))
PREEMPTIONS = Counter("aigc_renderer_preemptions", "Urgent batches rendered while a batch was suspended")
CANCELLATIONS = Counter("aigc_renderer_cancellations", "Tasks cancelled before or while rendering")
OOM_SPLITS = Counter("aigc_renderer_oom_splits", "Batches split after the device ran out of memory")
SUSPENDED = Gauge("aigc_renderer_suspended_batches", "Batches suspended between two steps right now")
TASKS = Counter("aigc_renderer_tasks", "Tasks finished, by class and outcome", ["priority", "outcome"])
OUTCOMES = ("rendered", "cancelled", "expired", "retried", "dead_lettered", "failed")


class BusyWindow(Collector):
    """When the device was busy, as intervals; exports the busy fraction of the last `BUSY_WINDOW_S`."""

    def __init__(self, clock: collections.abc.Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started_at = clock()
        self.lock = threading.Lock()
        self.intervals: collections.deque[tuple[float, float]] = collections.deque()
        self.busy_since: float | None = None
        self.total_s = 0.0

    def busy(self) -> None:
        """The device started rendering (no change when it already was)."""
        with self.lock:
            if self.busy_since is None:
                self.busy_since = self.clock()

    def idle(self) -> None:
        """The device stopped rendering: close the busy interval."""
        with self.lock:
            if self.busy_since is None:
                return
            now = self.clock()
            self.intervals.append((self.busy_since, now))
            self.total_s += now - self.busy_since
            self.busy_since = None
            self._prune(now)

    def _prune(self, now: float) -> None:
        while self.intervals and self.intervals[0][1] < now - BUSY_WINDOW_S:
            self.intervals.popleft()

    def ratio(self) -> float:
        """The fraction of the last `BUSY_WINDOW_S` (or of the process's life, if shorter) spent busy."""
        with self.lock:
            now = self.clock()
            self._prune(now)
            since = max(now - BUSY_WINDOW_S, self.started_at)
            spans = [*self.intervals, *([(self.busy_since, now)] if self.busy_since is not None else [])]
            busy = sum(max(0.0, end - max(start, since)) for start, end in spans)
            return min(1.0, busy / (now - since)) if now > since else 0.0

    def seconds(self) -> float:
        """Seconds spent busy since the process started, the current interval included."""
        with self.lock:
            return self.total_s + (self.clock() - self.busy_since if self.busy_since is not None else 0.0)

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        """The busy ratio, busy seconds and (where CUDA is in use) device memory, computed at scrape."""
        yield GaugeMetricFamily(
            "aigc_renderer_busy_ratio",
            "Fraction of the last 10 s the device spent rendering",
            value=self.ratio(),
        )
        yield CounterMetricFamily(
            "aigc_renderer_busy_seconds", "Seconds the device spent rendering", value=self.seconds()
        )
        memory = _cuda_memory()
        if memory is not None:
            yield GaugeMetricFamily(
                "aigc_renderer_device_memory_bytes", "CUDA memory allocated by torch", value=memory
            )


def _cuda_memory() -> float | None:
    torch = sys.modules.get("torch")  # only where a diffusers backend loaded it
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return float(torch.cuda.memory_allocated())


class RendererMetrics:
    """The renderer's calls into its metrics (one per process, see `renderer_metrics`)."""

    def __init__(self) -> None:
        self.busy_window = BusyWindow()
        self.depth = 0

    def batch_started(self, tasks: Sequence[Task], frames: int) -> None:
        """A batch of ``tasks`` (``frames`` frames) starts: count it and observe each task's queue wait."""
        if not enabled():
            return
        self.depth += 1
        if self.depth == 1:
            self.busy_window.busy()
        SUSPENDED.set(self.depth - 1)
        BATCH_SIZE.observe(frames)
        now = now_ms()
        for task in tasks:
            enqueued = task.record.enqueued_at
            if enqueued:
                QUEUE_WAIT.labels(priority_label(task.priority)).observe(max(0, now - enqueued) / 1000)

    def batch_ended(self) -> None:
        """The batch started last has ended (rendered, failed or abandoned)."""
        if not enabled() or self.depth == 0:
            return
        self.depth -= 1
        if self.depth == 0:
            self.busy_window.idle()
        SUSPENDED.set(max(0, self.depth - 1))

    def step(self, seconds: float) -> None:
        """One denoising step took ``seconds``."""
        if enabled():
            STEP.observe(seconds)

    def preempted(self) -> None:
        """An urgent batch was rendered while another was suspended."""
        if enabled():
            PREEMPTIONS.inc()

    def oom_split(self) -> None:
        """A batch was split after the device ran out of memory."""
        if enabled():
            OOM_SPLITS.inc()

    def task_done(self, task: Task, outcome: str, started_at_ms: int | None = None) -> None:
        """A task's outcome is out (``rendered`` with its render start, or another outcome)."""
        if not enabled():
            return
        priority = priority_label(task.priority)
        TASKS.labels(priority, outcome if outcome in OUTCOMES else "failed").inc()
        if outcome == "cancelled":
            CANCELLATIONS.inc()
        if started_at_ms is not None:
            TASK.labels(priority).observe(max(0, now_ms() - started_at_ms) / 1000)


_instance: dict[str, RendererMetrics] = {}
_lock = threading.Lock()


def renderer_metrics() -> RendererMetrics:
    """This process's renderer metrics (its busy-time collector registered once)."""
    with _lock:
        if "renderer" not in _instance:
            _instance["renderer"] = RendererMetrics()
            REGISTRY.register(_instance["renderer"].busy_window)
        return _instance["renderer"]
