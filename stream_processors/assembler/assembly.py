"""Turn a request's staged frames into its final objects, and a terminal row into a Completion.

Consumes frame rows (staging bucket keys) and the request's context (a FramesRendered record or a stored
row); produces objects in the results bucket under ``<tenant>/<yyyy>/<mm>/<dd>/<request_id>/`` with
deterministic names, so assembling twice writes the same objects. Images are copied server-side when
the format is unchanged (PNG) and re-encoded otherwise; a video is decoded frame by frame and encoded
as H.264 MP4 at the requested fps.

A request whose output moderation blocked it gets no result objects: its staged frames are copied to the
quarantine bucket under the same prefix (``.../<request_id>/frame-<index>.png``), which no presigned URL
is ever made for.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import cast

import numpy as np
from numpy.typing import NDArray

from plumbing import tracing
from plumbing.blobs import BlobStore, StoredBlob, result_prefix
from plumbing.errors import PermanentError
from plumbing.metadata import OutputRow
from schemas.records import Completion, CompletionStatus, FramesRendered, Kind, Output, Timings
from stream_processors.assembler.metrics import ASSEMBLY, ENCODE, timed
from stream_processors.assembler.store import FrameRow, TerminalRow, moderation_verdict, ms
from stream_processors.assembler.video import decode_png, encode_image, encode_mp4

CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "MP4": "video/mp4"}
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "MP4": "mp4"}


class Assembler:
    """Stores a request's final objects from its staged frames (or quarantines them), in a thread pool."""

    def __init__(
        self, blobs: BlobStore, results_bucket: str, quarantine_bucket: str, pool: ThreadPoolExecutor
    ) -> None:
        self.blobs = blobs
        self.bucket = results_bucket
        self.quarantine_bucket = quarantine_bucket
        self.pool = pool

    def pixels(self, frames: Sequence[FrameRow]) -> list[NDArray[np.uint8]]:
        """The staged frames decoded to RGB arrays, in frame order (downloaded in parallel)."""
        ordered = sorted(frames, key=lambda f: f.frame_index)
        return list(self.pool.map(self._decode, ordered))

    def _decode(self, frame: FrameRow) -> NDArray[np.uint8]:
        """One staged frame's pixels; one that cannot be decoded can never be checked or published, so it
        is a permanent failure (its FramesRendered message is dead-lettered), not a crash."""
        try:
            return decode_png(self.blobs.get(frame.bucket, frame.key))
        except ValueError as exc:
            raise PermanentError(
                f"staged frame {frame.frame_index} (s3://{frame.bucket}/{frame.key}) is not an image: {exc}",
                code="UNDECODABLE_FRAME",
            ) from exc

    @tracing.step("assembler.assemble")
    def assemble(
        self,
        request: FramesRendered,
        frames: Sequence[FrameRow],
        pixels: Sequence[NDArray[np.uint8]] | None = None,
    ) -> list[OutputRow]:
        """Store the final objects of ``request`` (the FramesRendered record that completed it) and
        describe them as the row stores them; a video is encoded from ``pixels`` (the frames already
        decoded, in order) when given."""
        ordered = sorted(frames, key=lambda f: f.frame_index)
        prefix = result_prefix(request.tenant_id, request.request_id, request.created_at)
        fmt = request.output_format
        if request.kind == "VIDEO":
            return timed(ASSEMBLY, lambda: [self._video(request, ordered, prefix, pixels)], "video")
        return timed(
            ASSEMBLY,
            lambda: list(self.pool.map(lambda f: self._image(request, f, prefix, fmt), ordered)),
            "image",
        )

    def quarantine(self, request: FramesRendered, frames: Sequence[FrameRow]) -> str:
        """Copy the staged frames of a blocked request to the quarantine bucket (server-side, same keys
        on a second try); return the ``s3://`` prefix that holds them."""
        prefix = result_prefix(request.tenant_id, request.request_id, request.created_at)

        def copy(f: FrameRow) -> None:
            staged = StoredBlob(f.bucket, f.key, f.sha256, f.bytes)
            key = f"{prefix}frame-{f.frame_index:05d}.png"
            self.blobs.copy(staged, self.quarantine_bucket, key, CONTENT_TYPES["PNG"])

        list(self.pool.map(copy, frames))
        return f"s3://{self.quarantine_bucket}/{prefix}"

    def _image(self, request: FramesRendered, frame: FrameRow, prefix: str, fmt: str) -> OutputRow:
        key = f"{prefix}image-{frame.frame_index}.{EXTENSIONS[fmt]}"
        staged = StoredBlob(frame.bucket, frame.key, frame.sha256, frame.bytes)
        if fmt == "PNG":
            stored = self.blobs.copy(staged, self.bucket, key, CONTENT_TYPES[fmt])
        else:
            pixels = decode_png(self.blobs.get(frame.bucket, frame.key))
            data = timed(ENCODE, lambda: encode_image(pixels, fmt))
            stored = self.blobs.put(self.bucket, key, data, CONTENT_TYPES[fmt])
        return OutputRow(
            "IMAGE",
            stored.bucket,
            stored.key,
            CONTENT_TYPES[fmt],
            stored.bytes,
            stored.sha256,
            request.width,
            request.height,
        )

    def _video(
        self,
        request: FramesRendered,
        frames: Sequence[FrameRow],
        prefix: str,
        pixels: Sequence[NDArray[np.uint8]] | None,
    ) -> OutputRow:
        pixels = list(pixels) if pixels is not None else self.pixels(frames)
        assert request.fps is not None, "a VIDEO request has fps (the gatekeeper validated it)"
        fps = int(request.fps)
        data = timed(ENCODE, lambda: encode_mp4(pixels, fps))
        stored = self.blobs.put(self.bucket, f"{prefix}video.mp4", data, CONTENT_TYPES["MP4"])
        return OutputRow(
            "VIDEO",
            stored.bucket,
            stored.key,
            CONTENT_TYPES["MP4"],
            stored.bytes,
            stored.sha256,
            request.width,
            request.height,
            duration_ms=round(len(frames) * 1000 / fps),
            frames=len(frames),
            fps=fps,
        )


def completion_from_row(
    row: TerminalRow, blobs: BlobStore, presign_ttl_s: int, webhook_url: str | None = None
) -> Completion:
    """The Completion of a terminal row, with fresh presigned URLs; ``webhook_url`` is the request's (from
    the input that decided it), for the webhook stage."""
    outputs = []
    for out in row.outputs or []:
        url, expires_at = blobs.presign(out.bucket, out.key, presign_ttl_s)
        outputs.append(
            Output(
                kind=cast(Kind, out.kind),
                uri=f"s3://{out.bucket}/{out.key}",
                presigned_url=url,
                presigned_expires_at=expires_at,
                content_type=out.content_type,
                bytes=out.bytes,
                sha256=out.sha256 or "",
                width=out.width,
                height=out.height,
                duration_ms=out.duration_ms,
                frames=out.frames,
                fps=out.fps,
            )
        )
    return Completion(
        request_id=row.request_id,
        tenant_id=row.tenant_id,
        status=cast(CompletionStatus, row.status),
        reason_code=row.reason_code,
        message=row.message,
        retry_after_ms=row.retry_after_ms,
        moderation=moderation_verdict(row.moderation),
        outputs=outputs,
        timings=Timings(
            queued_ms=row.queued_ms or 0,
            render_ms=row.render_ms or 0,
            assemble_ms=row.assemble_ms or 0,
            total_ms=row.total_ms or 0,
        ),
        labels=dict(row.labels or {}),
        created_at=ms(row.created_at),
        finished_at=ms(row.finished_at),
        webhook_url=webhook_url,
    )
