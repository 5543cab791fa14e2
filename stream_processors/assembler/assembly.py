"""Turn a request's staged frames into its final objects, and a terminal row into a Completion.

Consumes frame rows (staging bucket keys) and the request's context (a FramesRendered record or a stored
row); produces objects in the results bucket under ``<tenant>/<yyyy>/<mm>/<dd>/<request_id>/`` with
deterministic names, so assembling twice writes the same objects. Images are copied server-side when
the format is unchanged (PNG) and re-encoded otherwise; a video is decoded frame by frame and encoded
as H.264 MP4 at the requested fps.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from plumbing.blobs import BlobStore, StoredBlob, result_prefix
from stream_processors.assembler.store import FrameRow, ms
from stream_processors.assembler.video import decode_png, encode_image, encode_mp4

CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "MP4": "video/mp4"}
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "MP4": "mp4"}


class Assembler:
    def __init__(self, blobs: BlobStore, results_bucket: str, pool: ThreadPoolExecutor) -> None:
        self.blobs = blobs
        self.bucket = results_bucket
        self.pool = pool

    def assemble(self, request: dict[str, Any], frames: Sequence[FrameRow]) -> list[dict[str, Any]]:
        """Store the final objects of ``request`` (a FramesRendered record) and describe them."""
        ordered = sorted(frames, key=lambda f: f.frame_index)
        prefix = result_prefix(request["tenant_id"], request["request_id"], request["created_at"])
        fmt = request["output_format"]
        if request["kind"] == "VIDEO":
            return [self._video(request, ordered, prefix)]
        return list(self.pool.map(lambda f: self._image(request, f, prefix, fmt), ordered))

    def _image(self, request: dict[str, Any], frame: FrameRow, prefix: str, fmt: str) -> dict[str, Any]:
        key = f"{prefix}image-{frame.frame_index}.{EXTENSIONS[fmt]}"
        staged = StoredBlob(frame.bucket, frame.key, frame.sha256, frame.bytes)
        if fmt == "PNG":
            stored = self.blobs.copy(staged, self.bucket, key, CONTENT_TYPES[fmt])
        else:
            pixels = decode_png(self.blobs.get(frame.bucket, frame.key))
            stored = self.blobs.put(self.bucket, key, encode_image(pixels, fmt), CONTENT_TYPES[fmt])
        return {
            "kind": "IMAGE",
            "bucket": stored.bucket,
            "key": stored.key,
            "content_type": CONTENT_TYPES[fmt],
            "bytes": stored.bytes,
            "sha256": stored.sha256,
            "width": request["width"],
            "height": request["height"],
            "duration_ms": None,
            "frames": None,
            "fps": None,
        }

    def _video(self, request: dict[str, Any], frames: Sequence[FrameRow], prefix: str) -> dict[str, Any]:
        pixels = list(self.pool.map(lambda f: decode_png(self.blobs.get(f.bucket, f.key)), frames))
        fps = int(request["fps"])
        data = encode_mp4(pixels, fps)
        stored = self.blobs.put(self.bucket, f"{prefix}video.mp4", data, CONTENT_TYPES["MP4"])
        return {
            "kind": "VIDEO",
            "bucket": stored.bucket,
            "key": stored.key,
            "content_type": CONTENT_TYPES["MP4"],
            "bytes": stored.bytes,
            "sha256": stored.sha256,
            "width": request["width"],
            "height": request["height"],
            "duration_ms": round(len(frames) * 1000 / fps),
            "frames": len(frames),
            "fps": fps,
        }


def completion_from_row(row: Any, blobs: BlobStore, presign_ttl_s: int) -> dict[str, Any]:
    """The Completion record of a terminal row, with fresh presigned URLs."""
    outputs = []
    for out in row.outputs or []:
        url, expires_at = blobs.presign(out.bucket, out.key, presign_ttl_s)
        outputs.append(
            {
                "kind": out.kind,
                "uri": f"s3://{out.bucket}/{out.key}",
                "presigned_url": url,
                "presigned_expires_at": expires_at,
                "content_type": out.content_type,
                "bytes": out.bytes,
                "sha256": out.sha256 or "",
                "width": out.width,
                "height": out.height,
                "duration_ms": out.duration_ms,
                "frames": out.frames,
                "fps": out.fps,
            }
        )
    return {
        "request_id": row.request_id,
        "tenant_id": row.tenant_id,
        "status": row.status,
        "reason_code": row.reason_code,
        "message": row.message,
        "retry_after_ms": row.retry_after_ms,
        "moderation": moderation_from_row(row.moderation),
        "outputs": outputs,
        "timings": {
            "queued_ms": row.queued_ms or 0,
            "render_ms": row.render_ms or 0,
            "assemble_ms": row.assemble_ms or 0,
            "total_ms": row.total_ms or 0,
        },
        "labels": dict(row.labels or {}),
        "created_at": ms(row.created_at),
        "finished_at": ms(row.finished_at),
    }


# ModerationVerdict fields that are not strings: the row's map<text, text> holds them as JSON.
_TYPED_MODERATION = ("model_version", "score", "scores")


def moderation_to_row(moderation: dict[str, Any] | None) -> dict[str, str] | None:
    """A Completion's moderation verdict as the row's map<text, text> (typed fields as JSON)."""
    if not moderation:
        return None
    return {k: json.dumps(v) if k in _TYPED_MODERATION else str(v) for k, v in moderation.items()}


def moderation_from_row(stored: Any) -> dict[str, Any] | None:
    """The verdict back from the row; rows written before the typed fields have none of them."""
    if not stored:
        return None
    return {k: json.loads(v) if k in _TYPED_MODERATION else v for k, v in dict(stored).items()}
