"""Everything the renderer sends, and the moment a task is done.

The `Outbox` receives the device loop's outcomes (`executor.Outcomes`): rendered frames are uploaded by
a small thread pool and announced by FramesRendered; a skipped task (cancelled, expired) is answered by
a FramesRendered without frames; a failed one is routed to a retry topic or the dead-letter topic
(`route_failure`), or rendered again later under back-pressure; progress goes to the status topic. Each
task has one outcome record, and only when the broker acknowledges it does the outbox call ``done``
(the renderer then ACCEPTs the task, or REJECTs a dead-lettered one, or commits its offset): a crash
before that repeats the task, never loses it. Delivery reports run on the renderer's main thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from confluent_kafka import KafkaError, Message, Producer

from gpu_consumers.executor import Rendered, task_slices
from gpu_consumers.intake import Ack, Coords
from gpu_consumers.metrics import renderer_metrics
from gpu_consumers.publisher import Publisher
from gpu_consumers.scheduler import Pick
from gpu_consumers.tasks import Task
from plumbing import tracing
from plumbing.backoff import Backoff
from plumbing.clock import now_ms
from plumbing.dead_letters import Failure, Original, dead_letter
from plumbing.errors import ErrorKind, classify, is_fatal
from plumbing.headers import Headers, continue_headers
from plumbing.log_format import bind_message
from plumbing.retries import route_failure
from plumbing.settings import Settings
from plumbing.topics import Stage, Topics
from schemas.codec import Codec
from schemas.records import TaskOutcome

log = logging.getLogger(__name__)
BACKPRESSURE_DELAY_S = 5.0
UPLOAD_ATTEMPTS = 4
# Between tries of a frame upload that failed for a passing reason: 0.4 s, 0.8 s, 1.6 s.
UPLOAD_BACKOFF = Backoff(first_s=0.4, max_s=1.6)
RESEND_DELAY_S = 1.0


class Outbox:
    """Outcomes of tasks out to Kafka and S3; ``done(coords, ack)`` once each is acknowledged."""

    def __init__(
        self,
        settings: Settings,
        codec: Codec,
        producer: Producer,
        publisher: Publisher,
        is_cancelled: Callable[[Task], bool],
        done: Callable[[Coords, Ack], None],
        requeue: Callable[[Task], None],
    ) -> None:
        self.settings = settings
        self.codec = codec
        self.topics = Topics(settings)
        self.producer = producer
        self.publisher = publisher
        self.is_cancelled = is_cancelled
        self.done = done
        self.requeue = requeue
        self.uploads = ThreadPoolExecutor(settings.renderer.upload_workers, thread_name_prefix="upload")
        self.delivered = 0
        self.metrics = renderer_metrics()

    # -- the device loop's outcomes (executor.Outcomes), called on the device thread ----------------
    def rendered(self, rendered: Rendered) -> None:
        """Upload each task's frames (thread pool), then announce them."""
        for task, start, end in task_slices(rendered.pick.tasks):
            if self.is_cancelled(task):  # cancelled while its batch rendered: drop the frames
                self.skipped(task, "CANCELLED")
                continue
            share = rendered.render_s * 1000 * task.frame_count / max(1, rendered.batch_frames)
            self.uploads.submit(
                self._traced_upload,
                task,
                rendered.frames[start:end],
                rendered.started_at_ms,
                round(share),
                rendered.batch_frames,
            )

    def skipped(self, task: Task, outcome: TaskOutcome) -> None:
        """Answer a task that was not rendered: CANCELLED or EXPIRED."""
        reason = "CANCELLED" if outcome == "CANCELLED" else "DEADLINE_EXCEEDED"
        message = (
            "cancelled by its owner" if outcome == "CANCELLED" else "the deadline passed before rendering"
        )
        with tracing.consuming("renderer.task", task.headers, priority=task.priority, outcome=outcome):
            value, headers = self.publisher.record(
                task,
                outcome,
                [],
                started_at=now_ms(),
                render_ms=0,
                batch_size=0,
                reason=reason,
                message=message,
            )
            topic = self.topics.frames(task.priority)
            self._produce(topic, value, task.request_id.encode(), headers, task.coords, Ack.ACCEPT)
        self.metrics.task_done(task, outcome.lower())

    def failed(self, pick: Pick, exc: BaseException) -> None:
        """Route the tasks of a failed batch: retry topic, dead letter, or (back-pressure) later again.

        An unknown error is raised again: the device loop stops, the process exits and the tasks,
        unacknowledged, are rendered again after a restart."""
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
                threading.Timer(BACKPRESSURE_DELAY_S, self.requeue, args=(task,)).start()
                continue
            log.warning("%s task %s: %s", "dead-lettered" if routed.dead else "retrying", task.task_id, exc)
            ack = Ack.REJECT if routed.dead else Ack.ACCEPT
            self._produce(routed.topic, routed.value, routed.key, routed.headers, task.coords, ack)
            self.metrics.task_done(task, "dead_lettered" if routed.dead else "retried")

    def progress(self, pick: Pick, done: int, total: int) -> None:
        """RUNNING events for the tasks of a batch (dropped, never waited for, when the queue is full)."""
        fraction = done / max(1, total)
        for task in pick.tasks:
            units = task.frame_count * task.record.steps
            with contextlib.suppress(BufferError):
                self.producer.produce(
                    self.topics.status,
                    self.publisher.progress(task, round(fraction * units), units),
                    task.request_id.encode(),
                    headers=continue_headers(task.headers, task.request_id, task.tenant_id),
                )

    # -- from the main thread ---------------------------------------------------------------------
    def dead_letter(self, original: Original, failure: Failure) -> None:
        """Dead-letter a consumed message with its bytes intact; REJECT it once acknowledged."""
        dlq = self.topics.dlq(Stage.RENDERER)
        value, headers = dead_letter(self.codec, original, failure, topic=dlq)
        coords = (original.topic, original.partition, original.offset)
        self._produce(dlq, value, original.key, headers, coords, Ack.REJECT)

    def close(self) -> None:
        """Finish the uploads in hand and wait for every outcome's acknowledgement."""
        self.uploads.shutdown(wait=True)
        self.producer.flush(30)

    # -- internals --------------------------------------------------------------------------------
    def _traced_upload(
        self, task: Task, frames: list[np.ndarray], started_at: int, render_ms: int, batch_size: int
    ) -> None:
        with tracing.render_task(
            task.headers, task.record, started_at, batch_size=batch_size, outcome="RENDERED"
        ):
            self._upload(task, frames, started_at, render_ms, batch_size)

    def _upload(
        self, task: Task, frames: list[np.ndarray], started_at: int, render_ms: int, batch_size: int
    ) -> None:
        bind_message(task.headers)
        try:
            checked = self.publisher.check(task, frames)
        except Exception as exc:  # noqa: BLE001 - routed like any failure of the task
            self.failed(Pick([task], task.priority, 0.0), exc)
            return
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                blobs = self.publisher.upload(task, frames)
                break
            except Exception as exc:  # noqa: BLE001 - classify() decides: retry here, or route the task
                if classify(exc) is not ErrorKind.RETRYABLE or attempt == UPLOAD_ATTEMPTS:
                    self.failed(Pick([task], task.priority, 0.0), exc)
                    return
                time.sleep(UPLOAD_BACKOFF.delay_s(attempt))
        value, headers = self.publisher.record(
            task,
            "RENDERED",
            blobs,
            started_at=started_at,
            render_ms=render_ms,
            batch_size=batch_size,
            output_check=checked,
        )
        topic = self.topics.frames(task.priority)
        self._produce(topic, value, task.request_id.encode(), headers, task.coords, Ack.ACCEPT)
        self.metrics.task_done(task, "rendered", started_at)

    @tracing.step("renderer.announce")
    def _produce(
        self, topic: str, value: bytes, key: bytes | None, headers: Headers, coords: Coords, ack: Ack
    ) -> None:
        """Produce the outcome of the task at ``coords``; once acknowledged, the task is done.

        A message the broker never acknowledged (an outage longer than librdkafka's own retries) is sent
        again, so its task is not left pending forever."""

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is None:
                self.delivered += 1
                self.done(coords, ack)
            elif not is_fatal(err):
                log.warning("output for %s:%s:%s not delivered (%s); sending it again", *coords, err)
                threading.Timer(RESEND_DELAY_S, send).start()
            else:
                log.error("output for %s:%s:%s not delivered (%s)", *coords, err)

        def send() -> None:
            while True:
                try:
                    self.producer.produce(topic, value, key, headers=headers, on_delivery=delivered)
                    return
                except BufferError:
                    time.sleep(0.01)

        send()
