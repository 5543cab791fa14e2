"""Pure rules of the gateway: a JSON body becomes a GenerationRequest, an Idempotency-Key a request id,
a request id the partition its status and completion records live on, a history position a cursor, and a
key's submissions a token bucket. No I/O here: unit-tested in tests/unit/test_gateway_requests.py.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from plumbing.errors import ValidationError
from plumbing.validation import ID_PATTERN
from schemas.records import Completion, GenerationRequest, StatusEvent, VideoSpec

# Body fields a client may send, with the record field each fills; the tenant, the request id and the
# creation time are the gateway's to set.
BODY_FIELDS = frozenset(
    {
        "prompt",
        "negative_prompt",
        "model",
        "width",
        "height",
        "steps",
        "guidance_scale",
        "seed",
        "num_images",
        "video",
        "output_format",
        "scheduler",
        "priority",
        "deadline_ms",
        "labels",
        "webhook_url",
    }
)
VIDEO_FIELDS = frozenset({"num_frames", "fps", "prompt_end", "seed_end"})
DEFAULTS = {"width": 64, "height": 64, "steps": 20, "guidance_scale": 7.5}


def uuid4_hex() -> str:
    """``uuid.uuid4().hex`` (random bits, version 4, RFC 4122 variant) without building a UUID object."""
    b = bytearray(os.urandom(16))
    b[6] = b[6] & 0x0F | 0x40
    b[8] = b[8] & 0x3F | 0x80
    return b.hex()


def request_id_for(tenant_id: str, idempotency_key: str | None) -> str:
    """The request id: a new uuid, or one derived from (tenant, Idempotency-Key), so a retried POST names
    the same request (the gatekeeper drops the duplicate) and two tenants' equal keys never collide."""
    if idempotency_key is None:
        return uuid4_hex()
    if not 1 <= len(idempotency_key) <= 255 or not idempotency_key.isprintable():
        raise ValidationError("Idempotency-Key", "must be 1-255 printable characters")
    return hashlib.sha256(f"{tenant_id}\n{idempotency_key}".encode()).hexdigest()[:32]


def record_from_body(
    body: Any,
    *,
    tenant_id: str,
    request_id: str,
    created_at: int,
    default_model: str,
    schema_fields: Collection[str],
) -> GenerationRequest:
    """The GenerationRequest a POST body asks for (not yet validated: `validate_request` is next).

    Unknown fields are refused by name. The body's values go on the record as they are (a wrong type is
    `validate_request`'s to name), a field it leaves out takes the gateway's default (`DEFAULTS`) or the
    schema's. ``webhook_url`` is set on the record only when the codec's GenerationRequest schema has that
    field (``schema_fields``), so the gateway works with either schema.
    """
    _check_body_fields(body)
    video = _video_of(body.get("video"))
    webhook_url = body.get("webhook_url")
    if webhook_url is not None and not (
        isinstance(webhook_url, str) and webhook_url.startswith(("http://", "https://"))
    ):
        raise ValidationError("webhook_url", "must be an http(s) URL")
    given = {k: v for k, v in body.items() if k not in ("video", "webhook_url", "model", "priority")}
    priority = body.get("priority", "NORMAL")
    if isinstance(priority, str):
        priority = priority.upper()  # validate_request checks the rest
    return GenerationRequest(
        **{**DEFAULTS, "prompt": None, **given},
        request_id=request_id,
        tenant_id=tenant_id,
        kind="VIDEO" if video is not None else "IMAGE",
        model=body.get("model") or default_model,
        priority=priority,
        video=video,
        created_at=created_at,
        webhook_url=webhook_url if "webhook_url" in schema_fields else None,
    )


def _check_body_fields(body: Any) -> None:
    if not isinstance(body, Mapping):
        raise ValidationError("body", "must be a JSON object")
    for name in body:
        if name not in BODY_FIELDS:
            raise ValidationError(str(name)[:64], "is not a field of a generation request")


def _video_of(video: Any) -> VideoSpec | None:
    """The body's ``video`` object as a VideoSpec (fps 8 unless given); None without one."""
    if video is None:
        return None
    if not isinstance(video, Mapping):
        raise ValidationError("video", "must be an object with num_frames and fps")
    for name in video:
        if name not in VIDEO_FIELDS:
            raise ValidationError(f"video.{str(name)[:64]}", "is not a field of a video")
    return VideoSpec(**{"num_frames": None, "fps": 8, **video})


def frames_of(request: GenerationRequest) -> int:
    """Frames a request renders: its video's, or its images."""
    return request.video.num_frames if request.video is not None else request.num_images


def progress_total(frames: int, steps: int) -> int:
    """Frame-steps of a request of ``frames`` frames (or images) at ``steps`` steps: what its progress
    counts up to."""
    return int(frames) * int(steps)


def status_json(event: StatusEvent, done: int, request_total: int) -> dict[str, Any]:
    """The JSON of a ``status`` SSE event: the StatusEvent's fields as Avro names them, with the request's
    progress summed over its render tasks (``done`` of ``request_total`` frame-steps)."""
    return {**event.to_avro(), "done": done, "request_total": request_total}


def completion_json(completion: Completion, outputs: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The JSON of a ``completion`` SSE event: the Completion's fields as Avro names them, its outputs
    replaced by ``outputs`` (those of the terminal row, freshly presigned) when given."""
    data = completion.to_avro()
    if outputs is not None:
        data["outputs"] = outputs
    return data


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (the Java client's, and librdkafka's ``murmur2_random``), as a signed int."""
    seed, m, r = 0x9747B28C, 0x5BD1E995, 24
    length = len(data)
    h = (seed ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    rest = length % 4
    tail = length - rest
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_of(key: str, partitions: int) -> int:
    """The partition a record keyed ``key`` lands on (status and completions are keyed by request id)."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True)
class Position:
    """Where an event stream stands on the request's partition: the next status and completion offsets.
    It is the SSE event id (``<status>.<completion>``), so a reconnect with Last-Event-ID resumes there."""

    status: int
    completion: int

    def __str__(self) -> str:
        return f"{self.status}.{self.completion}"

    @classmethod
    def parse(cls, text: str) -> Position:
        """The position an SSE event id (a Last-Event-ID header) names; ValidationError for another text."""
        status, _, completion = text.partition(".")
        try:
            position = cls(int(status), int(completion))
        except ValueError:
            raise ValidationError("Last-Event-ID", f"must be <offset>.<offset>, got {text[:40]!r}") from None
        if position.status < 0 or position.completion < 0:
            raise ValidationError("Last-Event-ID", "offsets must not be negative")
        return position


def encode_cursor(month: str, created_at_ms: int, request_id: str) -> str:
    """The opaque cursor of a history page that ends at this entry (`decode_cursor` reads it back)."""
    raw = json.dumps([month, created_at_ms, request_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, int, str]:
    """(month, created_at ms, request_id) of the last entry of the previous page."""
    try:
        month, created_at, request_id = json.loads(
            base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        )
        if not (isinstance(month, str) and len(month) == 7 and isinstance(created_at, int)):
            raise ValueError
        if not (isinstance(request_id, str) and ID_PATTERN.fullmatch(request_id)):
            raise ValueError
    except (ValueError, TypeError, binascii.Error):
        raise ValidationError("cursor", "is not a cursor this API gave out") from None
    return month, created_at, request_id


def previous_month(month: str) -> str:
    """The month (``YYYY-MM``) before ``month``."""
    year, mon = int(month[:4]), int(month[5:7])
    return f"{year - 1:04d}-12" if mon == 1 else f"{year:04d}-{mon - 1:02d}"


class RateLimiter:
    """A token bucket per API key: ``rate`` submissions a second, ``burst`` at once. Thread-safe."""

    def __init__(self, rate: float, burst: float, clock: Any = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when a submission may go now (a token is taken), else the seconds until one may."""
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
