"""The renderer worker of one pool: render topics in, staged frames and FramesRendered out.

Consumes ``aigc.render.<pool>.{high,normal,low}`` as consumer group ``<prefix>.renderer.<pool>``;
produces ``aigc.frames`` (one FramesRendered per task: RENDERED, CANCELLED, EXPIRED or FAILED),
RUNNING status events and dead letters. This module knows Kafka, not diffusers: the device loop
(`executor`) renders and the `Scheduler` chooses.

Threads: the main thread polls Kafka, feeds the scheduler, pauses a class's partitions while it has
about one batch buffered (prefetch stays bounded; the backlog stays in Kafka where other renderers can
take it), serves delivery reports and commits. The device thread renders. A small pool uploads frames.
The main thread keeps polling however long a render takes, so a slow render never exceeds the
consumer's poll interval and never triggers a rebalance.

Delivery: a task's offset is committed only after its frames are uploaded and its FramesRendered is
acknowledged by the broker, and only once every earlier offset of the partition is done too
(`OffsetTracker`). A crash therefore repeats unfinished tasks (the same keys are overwritten, the
assembler counts frames once) and never loses one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from confluent_kafka import KafkaError, Message, TopicPartition

from gpu_consumers.backends import Backend, make_backend
from gpu_consumers.executor import DeviceLoop, Rendered, task_slices
from gpu_consumers.offsets import OffsetTracker
from gpu_consumers.publisher import Publisher, now_ms
from gpu_consumers.scheduler import CLASSES, Pick, Scheduler
from gpu_consumers.tasks import Task
from plumbing.blobs import BlobStore
from plumbing.cancellations import CancellationWatcher
from plumbing.dead_letters import Failure, Original, dead_letter
from plumbing.errors import DecodeError, ErrorKind, UnknownModelError, classify
from plumbing.headers import Headers, continue_headers
from plumbing.kafka_clients import consume_available, header_map, make_consumer, make_producer
from plumbing.retries import route_failure
from plumbing.settings import Settings
from plumbing.topics import Priority, Stage, Topics
from schemas.codec import default_codec

log = logging.getLogger(__name__)
COMMIT_INTERVAL_S = 1.0  # a crash repeats at most about a second of work; commits cost the broker
BACKPRESSURE_DELAY_S = 5.0
UPLOAD_ATTEMPTS = 4


class Renderer:
    def __init__(
        self, settings: Settings, pool: str, backend_overrides: dict[str, Any] | None = None
    ) -> None:
        conf = settings.renderer
        self.settings = settings
        self.pool = pool
        self.topics = Topics(settings)
        self.codec = default_codec()
        self.worker_id = conf.worker_id or settings.instance or f"{socket.gethostname()}-{os.getpid()}"
        self.models = {name: spec for name, spec in settings.models.items() if spec.pool == pool}
        if not self.models:
            raise ValueError(f"no model in the registry is served by pool {pool!r}")
        self.max_frames = min(spec.max_batch for spec in self.models.values())
        self.backend_overrides = backend_overrides or {}
        self.by_class = {Priority(c).value: self.topics.render(pool, c) for c in CLASSES}
        self.class_of = {topic: cls for cls, topic in self.by_class.items()}
        self.consumer = make_consumer(
            settings,
            f"{settings.kafka.topic_prefix}.renderer.{pool}",
            f"renderer.{pool}",
            # range splits each priority topic across the group: every renderer sees every class (sticky
            # assignors balance partition counts over all topics, leaving a class on one member).
            # Static membership keeps restarts from triggering its stop-the-world rebalances.
            **{"max.poll.interval.ms": conf.max_poll_interval_ms, "partition.assignment.strategy": "range"},
        )
        self.producer = make_producer(settings, f"renderer.{pool}")
        self.blobs = BlobStore(settings.s3, max_connections=conf.upload_workers * 2)
        self.publisher = Publisher(
            self.codec, self.blobs, settings.s3.staging_bucket, self.topics.frames, self.worker_id
        )
        self.lock = threading.Condition()
        self.scheduler = Scheduler(conf.weights, conf.aging_s, conf.batch_wait_ms / 1000)
        self.tracker = OffsetTracker()
        self.uploads = ThreadPoolExecutor(conf.upload_workers, thread_name_prefix="upload")
        self.cancellations = CancellationWatcher(settings)
        self.backends: dict[str, Backend] = {}
        self.device = DeviceLoop(
            self.scheduler,
            self.lock,
            self._backend,
            self._publish,
            self._skip_reason,
            self._answer_skipped,
            self._progress,
            self._failed,
            self._cancelled,
            self.max_frames,
            conf.progress_interval_s,
        )
        self.assigned: set[tuple[str, int]] = set()
        self.paused: set[str] = set()
        self.delivered = 0

    # -- backends, run on the device thread -------------------------------------------------------------
    def _backend(self, model: str) -> Backend:
        backend = self.backends.get(model)
        if backend is None:
            spec = self.models[model]
            kind = self.backend_overrides.get("kind", spec.backend)
            if kind == "synthetic":
                conf = self.settings.renderer
                backend = make_backend(
                    "synthetic",
                    name=model,
                    max_batch=spec.max_batch,
                    service_ms_per_frame=self.backend_overrides.get(
                        "service_ms_per_frame", conf.synthetic_ms_per_frame
                    ),
                    steps=self.backend_overrides.get("steps", conf.synthetic_steps),
                )
            else:
                self._limit_cpu_threads()
                backend = make_backend(
                    "diffusers",
                    model_path=spec.path,
                    name=model,
                    max_batch=spec.max_batch,
                    device=self.settings.renderer.device,
                )
            log.info("loaded model %s (%s backend)", model, kind)
            self.backends[model] = backend
        return backend

    def _limit_cpu_threads(self) -> None:
        import torch

        device = self.settings.renderer.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cpu":
            torch.set_num_threads(self.settings.renderer.cpu_threads)

    def warm_up(self) -> None:
        """Load every model of the pool before taking work (a model loads once, here)."""
        for model in self.models:
            self._backend(model)

    # -- callbacks from the device thread -------------------------------------------------------------
    def _cancelled(self, task: Task) -> bool:
        return self.cancellations.is_cancelled(task.request_id, task.tenant_id)

    def _skip_reason(self, task: Task) -> str | None:
        if self._cancelled(task):
            return "CANCELLED"
        deadline = task.record.get("deadline_ms")
        if deadline is not None and deadline <= now_ms():
            return "EXPIRED"
        return None

    def _answer_skipped(self, task: Task, outcome: str) -> None:
        reason = "CANCELLED" if outcome == "CANCELLED" else "DEADLINE_EXCEEDED"
        message = (
            "cancelled by its owner" if outcome == "CANCELLED" else "the deadline passed before rendering"
        )
        value, headers = self.publisher.record(
            task, outcome, [], started_at=now_ms(), render_ms=0, batch_size=0, reason=reason, message=message
        )
        self._produce_result(task, value, headers)

    def _failed(self, pick: Pick, exc: BaseException) -> None:
        """Route the tasks of a failed batch: retry topic, dead letter, or (back-pressure) later again.

        An unknown error is raised again: the device loop stops, the process exits and the tasks,
        uncommitted, are rendered again after a restart.
        """
        for task in pick.tasks:
            assert task.original is not None
            routed = route_failure(
                self.codec,
                self.topics,
                self.settings.retry,
                Stage.RENDERER,
                task.original,
                exc,
                now_ms(),
                task.request_id,
                task.tenant_id,
            )
            if routed is None:
                log.warning(
                    "back-pressure on %s (%s): rendering it again in %.0f s",
                    task.task_id,
                    exc,
                    BACKPRESSURE_DELAY_S,
                )
                threading.Timer(BACKPRESSURE_DELAY_S, self._requeue, args=(task,)).start()
                continue
            log.warning("%s task %s: %s", "dead-lettered" if routed.dead else "retrying", task.task_id, exc)
            self._produce(routed.topic, routed.value, routed.key, routed.headers, task)

    def _requeue(self, task: Task) -> None:
        with self.lock:
            if (task.topic, task.partition) in self.assigned:
                self.scheduler.add(task)
                self.lock.notify_all()

    def _progress(self, pick: Pick, done: int, total: int) -> None:
        fraction = done / max(1, total)
        for task in pick.tasks:
            units = task.frame_count * int(task.record["steps"])
            with contextlib.suppress(BufferError):  # progress is informational: drop it, never block on it
                self.producer.produce(
                    self.topics.status,
                    self.publisher.progress(task, round(fraction * units), units),
                    task.request_id.encode(),
                    headers=continue_headers(task.headers, task.request_id, task.tenant_id),
                )

    def _publish(self, rendered: Rendered) -> None:
        for task, start, end in task_slices(rendered.pick.tasks):
            if self._cancelled(task):  # cancelled while its batch rendered: drop the frames
                self._answer_skipped(task, "CANCELLED")
                continue
            share = rendered.render_s * 1000 * task.frame_count / max(1, rendered.batch_frames)
            self.uploads.submit(
                self._upload,
                task,
                rendered.frames[start:end],
                rendered.started_at_ms,
                round(share),
                rendered.batch_frames,
            )

    def _upload(
        self, task: Task, frames: list[Any], started_at: int, render_ms: int, batch_size: int
    ) -> None:
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                blobs = self.publisher.upload(task, frames)
                break
            except Exception as exc:  # noqa: BLE001 - classify() decides: retry here, or route the task
                if classify(exc) is not ErrorKind.RETRYABLE or attempt == UPLOAD_ATTEMPTS:
                    self._failed(Pick([task], task.priority, 0.0), exc)
                    return
                time.sleep(0.2 * 2**attempt)
        value, headers = self.publisher.record(
            task, "RENDERED", blobs, started_at=started_at, render_ms=render_ms, batch_size=batch_size
        )
        self._produce_result(task, value, headers)

    def _mark_done(
        self, topic: str, partition: int, offset: int, resend: Callable[[], None] | None = None
    ) -> Any:
        """A delivery report that lets the task's offset be committed (reports run on the main thread).

        A message the broker never acknowledged (an outage longer than librdkafka's own retries) is sent
        again, so its task's offset is not left pending forever."""

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is None:
                self.tracker.done(topic, partition, offset)
                self.delivered += 1
            elif resend is not None and not err.fatal():
                log.warning(
                    "output for %s:%s:%s not delivered (%s); sending it again", topic, partition, offset, err
                )
                threading.Timer(1.0, resend).start()
            else:
                log.error("output for %s:%s:%s not delivered (%s)", topic, partition, offset, err)

        return delivered

    def _produce_result(self, task: Task, value: bytes, headers: Headers) -> None:
        self._produce(self.topics.frames, value, task.request_id.encode(), headers, task)

    def _produce(self, topic: str, value: bytes, key: bytes | None, headers: Headers, task: Task) -> None:
        """Produce the outcome of ``task``; once acknowledged, its offset may be committed."""

        def send() -> None:
            report = self._mark_done(task.topic, task.partition, task.offset, send)
            while True:
                try:
                    self.producer.produce(topic, value, key, headers=headers, on_delivery=report)
                    return
                except BufferError:
                    time.sleep(0.01)

        send()

    # -- the main loop ----------------------------------------------------------------------------
    def run(self, stop: threading.Event, ready: threading.Event | None = None) -> None:
        self.cancellations.start()
        self.warm_up()
        device = threading.Thread(target=self.device.run, args=(stop,), name="device", daemon=True)
        device.start()
        self.consumer.subscribe(
            list(self.by_class.values()),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        log.info("renderer %s serving pool %s (%s)", self.worker_id, self.pool, ", ".join(self.models))
        if ready is not None:
            ready.set()
        last_commit = 0.0
        try:
            while not stop.is_set():
                if self.device.crashed is not None:
                    raise RuntimeError("the device loop crashed; see the log above") from self.device.crashed
                # At most one batch per call: with the pause below, a class never buffers much more than
                # one batch ahead, and the rest of the backlog stays in Kafka for the whole group.
                wait = 0.01 if self.scheduler.buffered_tasks() else 0.05
                for msg in consume_available(self.consumer, self.max_frames, wait):
                    self._take(msg)
                self._apply_backpressure()
                self.producer.poll(0)
                if time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                    self._commit()
                    last_commit = time.monotonic()
        finally:
            # Graceful stop: take no new batch, let the one in hand finish within the grace period, else
            # abandon it between two steps (its offsets stay uncommitted: handed back to the group).
            stop.set()
            with self.lock:
                self.lock.notify_all()
            device.join(timeout=self.settings.renderer.shutdown_grace_s)
            if device.is_alive():
                self.device.abandon.set()
                device.join(timeout=60)
            self.uploads.shutdown(wait=True)
            self.producer.flush(30)
            self._commit(asynchronous=False)
            self.consumer.close()
            self.cancellations.stop()

    def _take(self, msg: Message) -> None:
        if msg.error():
            log.warning("consumer error: %s", msg.error())
            return
        original = Original.of(msg)
        self.tracker.track(original.topic, original.partition, original.offset)
        try:
            record = self.codec.decode(msg.value(), "RenderTask")
        except DecodeError as exc:
            value, headers = dead_letter(
                self.codec, original, Failure.of(Stage.RENDERER, exc, 1, now_ms(), now_ms())
            )
            self.producer.produce(
                self.topics.dlq(Stage.RENDERER),
                value,
                msg.key(),
                headers=headers,
                on_delivery=self._mark_done(original.topic, original.partition, original.offset),
            )
            return
        task = Task(
            record,
            original.topic,
            original.partition,
            original.offset,
            header_map(msg),
            time.monotonic(),
            original,
        )
        if record["model"] not in self.models:
            # The gatekeeper's registry routed it here but this pool's does not serve it: a configuration
            # mismatch, dead-lettered for replay once the registries agree.
            self._failed(Pick([task], task.priority, 0.0), UnknownModelError(record["model"]))
            return
        with self.lock:
            self.scheduler.add(task)
            self.lock.notify_all()

    def _apply_backpressure(self) -> None:
        """Pause a class's partitions while about one batch of it is buffered; resume below that."""
        for cls, topic in self.by_class.items():
            full = self.scheduler.buffered_frames(cls) >= self.max_frames
            partitions = [TopicPartition(t, p) for t, p in self.assigned if t == topic]
            if full and topic not in self.paused and partitions:
                self.consumer.pause(partitions)
                self.paused.add(topic)
            elif not full and topic in self.paused:
                self.consumer.resume(partitions)
                self.paused.discard(topic)

    def _commit(self, asynchronous: bool = True) -> None:
        offsets = [
            TopicPartition(t, p, o)
            for (t, p), o in self.tracker.committable().items()
            if (t, p) in self.assigned
        ]
        if offsets:
            try:
                if asynchronous:
                    self.consumer.commit(offsets=offsets, asynchronous=True)
                else:
                    self.consumer.commit(offsets=offsets, asynchronous=False)
            except Exception as exc:
                if classify(exc) is None:
                    raise
                log.warning("commit failed (%s); it will be retried", exc)

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.assigned |= {(tp.topic, tp.partition) for tp in partitions}
        paused = [tp for tp in partitions if tp.topic in self.paused]
        if paused:
            consumer.pause(paused)

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self._commit(asynchronous=False)
        # librdkafka keeps a partition paused across its revocation: resume it, or one assigned back
        # after its topic was resumed would never be fetched again (`_on_assign` pauses it anew if due).
        consumer.resume(partitions)
        with self.lock:
            for tp in partitions:
                self.scheduler.remove_partition(tp.topic, tp.partition)
        for tp in partitions:
            self.tracker.forget(tp.topic, tp.partition)
            self.assigned.discard((tp.topic, tp.partition))


def run(settings: Settings, pool: str, backend_overrides: dict[str, Any] | None = None) -> None:
    """Run one renderer process until SIGINT or SIGTERM; work in hand is finished and committed first."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    Renderer(settings, pool, backend_overrides).run(stop)
