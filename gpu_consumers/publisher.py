"""Rendered frames out: check them (output moderation), PNG-encode, upload to the staging bucket, then
announce FramesRendered.

The output check (nudenet, `plumbing.output_check`) runs here, on the pixels the renderer already holds,
so it scales with the renderers and costs no download or decode; its result travels in the record
(``output_check``) and the sink quarantines a blocked task's frames instead of publishing them.

Frames are uploaded under deterministic keys (``<tenant>/<request>/frames/<index>.png``) before the
FramesRendered record that names them is produced, so the assembler never sees a frame that is not
stored, and a repeated render overwrites the same objects. The record's delivery report tells the
renderer the task is done (its offset may then be committed).
"""

from __future__ import annotations

import cv2
import numpy as np

from gpu_consumers.tasks import Task
from plumbing import tracing
from plumbing.blobs import BlobStore, frame_key
from plumbing.clock import now_ms
from plumbing.headers import Headers, continue_headers
from plumbing.output_check import OutputCheck
from plumbing.topics import Stage
from schemas.codec import Codec
from schemas.records import (
    BlobRef,
    FramesRendered,
    OutputBlock,
    OutputCheckResult,
    Progress,
    StatusEvent,
    TaskOutcome,
)


def encode_png(frame: np.ndarray) -> bytes:
    """The PNG file of an RGB frame, at low compression (fast to write, the assembler re-encodes)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError(f"could not PNG-encode a frame of shape {frame.shape}")
    return bytes(buf)


class Publisher:
    """Builds the renderer's records (FramesRendered, RUNNING StatusEvent) and stores the frames they name."""

    def __init__(
        self,
        codec: Codec,
        blobs: BlobStore,
        staging_bucket: str,
        worker_id: str,
        checker: OutputCheck | None = None,
    ) -> None:
        self.codec = codec
        self.blobs = blobs
        self.bucket = staging_bucket
        self.worker_id = worker_id
        self.checker = checker

    def check(self, task: Task, frames: list[np.ndarray]) -> OutputCheckResult | None:
        """The FramesRendered ``output_check`` of ``task``'s frames; None when the check is off."""
        if self.checker is None:
            return None
        verdict = self.checker.check(frames)
        blocked = None
        if verdict is not None:
            blocked = OutputBlock(
                reason=verdict.reason,
                score=verdict.score,
                threshold=verdict.threshold,
                frame_index=task.record.frame_start + verdict.frame_index,
            )
        return OutputCheckResult(
            policy_version=self.checker.policy_version,
            model_version=self.checker.detector.model_version,
            blocked=blocked,
            scores=dict(verdict.scores) if verdict is not None else {},
        )

    @tracing.step("renderer.upload")
    def upload(self, task: Task, frames: list[np.ndarray]) -> list[BlobRef]:
        """Store ``task``'s frames as PNGs under their deterministic keys; the references, in frame order."""
        r = task.record
        blobs = []
        for index, frame in zip(range(r.frame_start, r.frame_end), frames, strict=True):
            stored = self.blobs.put(
                self.bucket, frame_key(task.tenant_id, task.request_id, index), encode_png(frame), "image/png"
            )
            blobs.append(
                BlobRef(
                    frame_index=index,
                    bucket=stored.bucket,
                    key=stored.key,
                    sha256=stored.sha256,
                    bytes=stored.bytes,
                )
            )
        return blobs

    def record(
        self,
        task: Task,
        outcome: TaskOutcome,
        blobs: list[BlobRef],
        *,
        started_at: int,
        render_ms: int,
        batch_size: int,
        reason: str | None = None,
        message: str | None = None,
        output_check: OutputCheckResult | None = None,
    ) -> tuple[bytes, Headers]:
        """The FramesRendered value and headers for ``task``."""
        r = task.record
        record = FramesRendered(
            request_id=r.request_id,
            tenant_id=r.tenant_id,
            task_id=r.task_id,
            outcome=outcome,
            reason_code=reason,
            message=message,
            kind=r.kind,
            priority=r.priority,
            model=r.model,
            prompt=r.prompt,
            prompt_end=r.prompt_end,
            negative_prompt=r.negative_prompt,
            steps=r.steps,
            guidance_scale=r.guidance_scale,
            scheduler=r.scheduler,
            seed=r.seed,
            frame_start=r.frame_start,
            frame_end=r.frame_end,
            frame_count=r.frame_count,
            blobs=blobs,
            width=r.width,
            height=r.height,
            fps=r.fps,
            output_format=r.output_format,
            reply_topic=r.reply_topic,
            webhook_url=r.webhook_url,
            labels=r.labels,
            created_at=r.created_at,
            accepted_at=r.accepted_at,
            enqueued_at=r.enqueued_at,
            started_at=started_at,
            finished_at=now_ms(),
            render_ms=render_ms,
            batch_size=batch_size,
            worker_id=self.worker_id,
            attempt=r.attempt,
            output_check=output_check,
        )
        return self.codec.write(record), continue_headers(task.headers, task.request_id, task.tenant_id)

    def progress(self, task: Task, done: int, total: int) -> bytes:
        """The RUNNING StatusEvent of ``task`` with ``done`` of its ``total`` frame-steps rendered."""
        record = StatusEvent(
            request_id=task.request_id,
            tenant_id=task.tenant_id,
            stage=Stage.RENDERER.value,
            state="RUNNING",
            progress=Progress(
                done=done, total=total, request_total=task.record.frame_count * task.record.steps
            ),
            task_id=task.task_id,
            worker_id=self.worker_id,
            message=None,
            at=now_ms(),
        )
        return self.codec.write(record)
