"""The renderer worker of one pool: render topics in, staged frames and FramesRendered out.

Consumes ``aigc.render.<pool>.{high,normal,low}``; produces ``aigc.frames`` (one FramesRendered per
task: RENDERED, CANCELLED, EXPIRED or FAILED), RUNNING status events, retries and dead letters. This
module knows Kafka, not diffusers. Four parts, each with a small interface:

- `intake.Intake` (``poll``, ``finish``, ``owns``, ``close``): where tasks come from and where their
  acknowledgements go: a share group by default (any idle renderer takes the next task), a classic
  consumer group behind ``renderer.consumer=classic``;
- `scheduler.Scheduler`: which buffered tasks run next (priority with bounded starvation, tenant
  turns, micro-batches);
- `executor.DeviceLoop`: the device thread (render, preempt between steps, cancel, skip);
- `outbox.Outbox`: uploads and records out; calls ``done`` when a task's outcome is acknowledged.

Threads: the main thread polls the intake, feeds the scheduler and serves delivery reports (which
acknowledge tasks); the device thread renders; a small pool uploads frames. A class takes new tasks
only while about one batch of it is buffered: the backlog stays in Kafka where other renderers take it.

Delivery: a task is acknowledged (ACCEPT in share mode, its offset committed in classic mode) only
after its frames are uploaded and its FramesRendered is acknowledged by the broker. A crash therefore
repeats unfinished tasks (the same keys are overwritten, the assembler counts frames once) and never
loses one; `intake` says how each mode hands tasks back.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import TypedDict

from confluent_kafka import Message

from gpu_consumers.backends import Backend, make_backend
from gpu_consumers.executor import DeviceLoop
from gpu_consumers.intake import coords, make_intake
from gpu_consumers.outbox import Outbox
from gpu_consumers.publisher import Publisher
from gpu_consumers.scheduler import CLASSES, Pick, Scheduler
from gpu_consumers.tasks import Task
from plumbing.blobs import BlobStore
from plumbing.call_counts import CallCounts
from plumbing.cancellations import CancellationWatcher
from plumbing.clock import now_ms
from plumbing.dead_letters import Failure, Original
from plumbing.errors import DecodeError, PermanentError, UnknownModelError
from plumbing.kafka_clients import header_map, make_producer
from plumbing.observability import Readiness, serve
from plumbing.output_check import NudeNetDetector, OutputCheck
from plumbing.settings import ModelSpec, Settings
from plumbing.shutdown import stop_on_signals
from plumbing.topics import Priority, Stage, Topics
from schemas.codec import default_codec
from schemas.records import RenderTask, TaskOutcome

log = logging.getLogger(__name__)
IDLE_POLL_S = 0.05
BUSY_POLL_S = 0.01
READINESS = ("model", "assigned", "storage")  # what /readyz waits for
ASSIGNMENT_TIMEOUT_S = 30.0  # "serving" is announced once the group assigned partitions, or after this


class DeliveriesExhausted(PermanentError):
    """The task was delivered as often as the share group allows (earlier renderers crashed on it)."""

    code = "DELIVERY_LIMIT"


class BackendOverrides(TypedDict, total=False):
    """What ``aigc render --synthetic-ms`` overrides in the registry: every model on the synthetic backend."""

    kind: str
    service_ms_per_frame: float
    steps: int


class Models:
    """The pool's model backends, each loaded once (on the device thread, or by ``warm_up``)."""

    def __init__(self, settings: Settings, models: dict[str, ModelSpec], overrides: BackendOverrides) -> None:
        self.settings = settings
        self.specs = models
        self.overrides = overrides
        self.loaded: dict[str, Backend] = {}

    def backend(self, model: str) -> Backend:
        """The loaded backend of ``model`` (loading it on first use)."""
        backend = self.loaded.get(model)
        if backend is None:
            spec = self.specs[model]
            conf = self.settings.renderer
            kind = self.overrides.get("kind", spec.backend)
            if kind == "synthetic":
                backend = make_backend(
                    "synthetic",
                    name=model,
                    max_batch=spec.max_batch,
                    service_ms_per_frame=self.overrides.get(
                        "service_ms_per_frame", conf.synthetic_ms_per_frame
                    ),
                    steps=self.overrides.get("steps", conf.synthetic_steps),
                )
            else:
                self._limit_cpu_threads()
                backend = make_backend(
                    "diffusers",
                    model_path=spec.path,
                    name=model,
                    max_batch=spec.max_batch,
                    device=conf.device,
                )
            log.info("loaded model %s (%s backend)", model, kind)
            self.loaded[model] = backend
        return backend

    def warm_up(self) -> None:
        """Load every model of the pool before taking work."""
        for model in self.specs:
            self.backend(model)

    def _limit_cpu_threads(self) -> None:
        import torch

        device = self.settings.renderer.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cpu":
            torch.set_num_threads(self.settings.renderer.cpu_threads)


class Checks:
    """Whether a task is cancelled (`CancellationWatcher`) or past its deadline (`executor.TaskChecks`)."""

    def __init__(self, cancellations: CancellationWatcher) -> None:
        self.cancellations = cancellations

    def is_cancelled(self, task: Task) -> bool:
        """True once the task's owner cancelled its request."""
        return self.cancellations.is_cancelled(task.request_id, task.tenant_id)

    def skip_reason(self, task: Task) -> TaskOutcome | None:
        """CANCELLED or EXPIRED (past ``deadline_ms``) when the task must not be rendered, else None."""
        if self.is_cancelled(task):
            return "CANCELLED"
        deadline = task.record.deadline_ms
        if deadline is not None and deadline <= now_ms():
            return "EXPIRED"
        return None


class Renderer:
    """One renderer process of a pool: wires the intake, scheduler, device loop and outbox together."""

    def __init__(
        self, settings: Settings, pool: str, backend_overrides: BackendOverrides | None = None
    ) -> None:
        conf = settings.renderer
        self.settings = settings
        self.pool = pool
        self.codec = default_codec()
        self.worker_id = conf.worker_id or settings.instance or f"{socket.gethostname()}-{os.getpid()}"
        specs = {name: spec for name, spec in settings.models.items() if spec.pool == pool}
        if not specs:
            raise ValueError(f"no model in the registry is served by pool {pool!r}")
        self.models = Models(settings, specs, backend_overrides or {})
        self.max_frames = min(spec.max_batch for spec in specs.values())
        topics = Topics(settings)
        by_class = {Priority(c).value: topics.render(pool, c) for c in CLASSES}
        self.intake = make_intake(settings, pool, by_class, self.max_frames, self._revoked)
        # In share mode a class's next tasks come only once its last poll is finished: waiting to fill a
        # batch would wait for nothing.
        batch_wait_s = conf.batch_wait_ms / 1000 if conf.consumer == "classic" else 0.0
        self.lock = threading.Condition()  # guards the scheduler
        self.scheduler = Scheduler(conf.weights, conf.aging_s, batch_wait_s)
        self.cancellations = CancellationWatcher(settings)
        checks = Checks(self.cancellations)
        self.producer = make_producer(settings, f"renderer.{pool}")
        self.blobs = blobs = BlobStore(
            settings.s3,
            max_connections=conf.upload_workers * 2,
            counts=CallCounts.when_on(settings.call_counts_dir),
        )
        self.readiness = Readiness()  # `run` replaces it with the process's (served on /readyz)
        check = settings.output_check
        checker = OutputCheck(NudeNetDetector(check.threads), check.unsafe_labels) if check.enabled else None
        publisher = Publisher(self.codec, blobs, settings.s3.staging_bucket, self.worker_id, checker)
        self.outbox = Outbox(
            settings,
            self.codec,
            self.producer,
            publisher,
            checks.is_cancelled,
            self.intake.finish,
            self._requeue,
        )
        self.device = DeviceLoop(
            self.scheduler,
            self.lock,
            self.models.backend,
            checks,
            self.outbox,
            self.max_frames,
            conf.progress_interval_s,
        )

    def run(self, stop: threading.Event, ready: threading.Event | None = None) -> None:
        """Render until ``stop``; then finish (or abandon) the batch in hand and hand the rest back."""
        self.cancellations.start()
        staging = self.settings.s3.staging_bucket
        self.readiness.require(*READINESS)
        self.readiness.check_until_met("storage", lambda: self.blobs.client.head_bucket(Bucket=staging))
        self.models.warm_up()
        self.readiness.mark("model")
        device = threading.Thread(target=self.device.run, args=(stop,), name="device", daemon=True)
        device.start()
        self.intake.start()
        deadline = time.monotonic() + ASSIGNMENT_TIMEOUT_S
        while not self.intake.assigned() and time.monotonic() < deadline and not stop.is_set():
            self._turn()  # tasks that come meanwhile are taken as usual
        log.info(
            "renderer %s serving pool %s (%s; %s consumer)",
            self.worker_id,
            self.pool,
            ", ".join(self.models.specs),
            self.settings.renderer.consumer,
        )
        if ready is not None:
            ready.set()
        assigned = False
        try:
            while not stop.is_set():
                if self.device.crashed is not None:
                    raise RuntimeError("the device loop crashed; see the log above") from self.device.crashed
                if not assigned and self.intake.assigned():
                    self.readiness.mark("assigned")
                    assigned = True
                self._turn()
        finally:
            # Graceful stop: take no new batch, let the one in hand finish within the grace period, else
            # abandon it between two steps; what is still held goes back to the group.
            stop.set()
            with self.lock:
                self.lock.notify_all()
            device.join(timeout=self.settings.renderer.shutdown_grace_s)
            if device.is_alive():
                self.device.abandon.set()
                device.join(timeout=60)
            self.outbox.close()
            self.intake.close()
            self.cancellations.stop()

    def _turn(self) -> None:
        """One turn of the main loop: take new tasks where a class has room, serve delivery reports."""
        with self.lock:
            busy = self.scheduler.buffered_tasks() > 0
            room = [c for c in CLASSES if self.scheduler.buffered_frames(c) < self.max_frames]
        for msg in self.intake.poll(room, BUSY_POLL_S if busy else IDLE_POLL_S):
            self._take(msg)
        self.producer.poll(0)
        self.intake.tick()

    def _take(self, msg: Message) -> None:
        """Decode a consumed task and give it to the scheduler; dead-letter what cannot be rendered."""
        original = Original.of(msg)
        if self.intake.exhausted(msg):
            self._dead_letter(original, DeliveriesExhausted(f"delivered {msg.delivery_count()} times"))
            return
        try:
            record = self.codec.read(msg.value(), RenderTask)
        except DecodeError as exc:
            self._dead_letter(original, exc)
            return
        topic, partition, offset = coords(msg)
        task = Task(record, topic, partition, offset, header_map(msg), time.monotonic(), original)
        if record.model not in self.models.specs:
            # The gatekeeper's registry routed it here but this pool's does not serve it: a configuration
            # mismatch, dead-lettered for replay once the registries agree.
            self.outbox.failed(Pick([task], task.priority, 0.0), UnknownModelError(record.model))
            return
        with self.lock:
            self.scheduler.add(task)
            self.lock.notify_all()

    def _dead_letter(self, original: Original, exc: Exception) -> None:
        log.warning("dead-lettering %s: %s", original.coordinates, exc)
        self.outbox.dead_letter(original, Failure.of(Stage.RENDERER, exc, 1, now_ms(), now_ms()))

    def _requeue(self, task: Task) -> None:
        """Back-pressure: schedule a task again later, if it is still this renderer's."""
        with self.lock:
            if self.intake.owns(task.coords):
                self.scheduler.add(task)
                self.lock.notify_all()

    def _revoked(self, topic: str, partition: int) -> None:
        """Classic mode: a partition went to another member; drop its buffered tasks."""
        with self.lock:
            self.scheduler.remove_partition(topic, partition)


def run(settings: Settings, pool: str, backend_overrides: BackendOverrides | None = None) -> None:
    """Run one renderer process until SIGINT or SIGTERM; work in hand is finished and acknowledged first."""
    stop = stop_on_signals()
    obs = serve(settings, Stage.RENDERER.value, *READINESS)
    renderer = Renderer(settings, pool, backend_overrides)
    renderer.readiness = obs.readiness
    renderer.run(stop)
