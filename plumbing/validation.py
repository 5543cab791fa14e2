"""Rules a GenerationRequest must follow, checked before any model time is spent.

The same function runs client-side in the SDK (so a caller learns at once which field is wrong) and in
the gatekeeper (which trusts no producer). It takes a typed record (`schemas.records.GenerationRequest`)
and raises `plumbing.errors.ValidationError` naming the first field at fault, with a reason code such as
``INVALID_WIDTH`` or ``UNKNOWN_MODEL``. A request whose deadline has already passed is not invalid: the
gatekeeper ends it EXPIRED instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection
from typing import Any
from urllib.parse import urlsplit

from plumbing.errors import UnknownModelError, ValidationError
from plumbing.settings import RequestLimits
from schemas.records import GenerationRequest

ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
TOPIC_PATTERN = re.compile(r"[a-zA-Z0-9._-]{1,249}")
SCHEDULERS = frozenset({"ddim", "euler", "dpm", "pndm"})
IMAGE_FORMATS = frozenset({"PNG", "JPEG"})
VIDEO_FORMATS = frozenset({"MP4"})
MAX_WEBHOOK_URL_CHARS = 2048
FUTURE_SKEW_MS = 3600 * 1000  # Kafka 4 rejects timestamps more than an hour ahead; so do we
# C0 controls other than tab, newline and carriage return, plus DEL: never meaningful in a prompt.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _check_id(field: str, value: Any) -> None:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ValidationError(field, f"must match ^[A-Za-z0-9_-]{{1,64}}$, got {str(value)[:80]!r}")


def _check_text(field: str, value: Any, limits: RequestLimits, required: bool) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str) or (required and not value.strip()):
        raise ValidationError(field, "must be a non-empty string")
    if len(value) > limits.max_prompt_chars:
        raise ValidationError(field, f"is {len(value)} characters, more than {limits.max_prompt_chars}")
    if _CONTROL.search(value):
        raise ValidationError(field, "contains control characters")


def _check_range(field: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValidationError(field, f"must be a number, got {value!r}")
    if not low <= value <= high:
        raise ValidationError(field, f"must be between {low:g} and {high:g}, got {value!r}")


def validate_request(
    request: GenerationRequest,
    limits: RequestLimits,
    models: Collection[str] | None,
    reply_prefix: Callable[[str], str] | None = None,
    now_ms: int | None = None,
) -> None:
    """Raise ValidationError for the first rule ``request`` breaks; return None when it is valid.

    ``models`` is the registry's model names (None skips that check, for clients that do not know the
    deployment's registry); ``reply_prefix`` gives a tenant's allowed reply-topic prefix.
    """
    _check_id("request_id", request.request_id)
    _check_id("tenant_id", request.tenant_id)
    if request.kind not in ("IMAGE", "VIDEO"):
        raise ValidationError("kind", f"must be IMAGE or VIDEO, got {request.kind!r}")
    if request.priority not in ("HIGH", "NORMAL", "LOW"):
        raise ValidationError("priority", "must be HIGH, NORMAL or LOW")
    _check_text("prompt", request.prompt, limits, required=True)
    _check_text("negative_prompt", request.negative_prompt, limits, required=False)
    model = request.model
    if not isinstance(model, str) or not model or (models is not None and model not in models):
        raise UnknownModelError(str(model)[:80])
    _check_rendering(request, limits)
    if request.kind == "IMAGE":
        _check_image(request, limits)
    else:
        _check_video(request, limits)
    _check_labels(request.labels or {}, limits)
    _check_times(request, limits, now_ms)
    _check_reply_topic(request, reply_prefix)
    if request.webhook_url is not None:
        check_webhook_url(request.webhook_url)


def _check_rendering(request: GenerationRequest, limits: RequestLimits) -> None:
    for field, size in (("width", request.width), ("height", request.height)):
        _check_range(field, size, limits.min_size, limits.max_size)
        if size % limits.size_multiple:
            raise ValidationError(field, f"must be a multiple of {limits.size_multiple}, got {size}")
    _check_range("steps", request.steps, 1, limits.max_steps)
    _check_range("guidance_scale", request.guidance_scale, limits.min_guidance, limits.max_guidance)
    scheduler = request.scheduler
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ValidationError(
            "scheduler", f"must be one of {', '.join(sorted(SCHEDULERS))}, got {str(scheduler)[:80]!r}"
        )


def _check_image(request: GenerationRequest, limits: RequestLimits) -> None:
    _check_range("num_images", request.num_images, 1, limits.max_images)
    if request.video is not None:
        raise ValidationError("video", "is only for VIDEO requests")
    fmt = request.output_format
    if fmt is not None and fmt not in IMAGE_FORMATS:
        raise ValidationError("output_format", f"an IMAGE request stores PNG or JPEG, not {fmt}")


def _check_video(request: GenerationRequest, limits: RequestLimits) -> None:
    video = request.video
    if video is None:
        raise ValidationError("video", "is required for a VIDEO request")
    _check_range("video.num_frames", video.num_frames, 2, limits.max_frames)
    _check_range("video.fps", video.fps, limits.min_fps, limits.max_fps)
    _check_text("video.prompt_end", video.prompt_end, limits, required=False)
    if request.num_images != 1:
        raise ValidationError("num_images", "must be 1 for a VIDEO request")
    fmt = request.output_format
    if fmt is not None and fmt not in VIDEO_FORMATS:
        raise ValidationError("output_format", f"a VIDEO request stores MP4, not {fmt}")


def _check_labels(labels: dict[str, str], limits: RequestLimits) -> None:
    if len(labels) > limits.max_labels:
        raise ValidationError("labels", f"has {len(labels)} entries, more than {limits.max_labels}")
    for key, value in labels.items():
        if len(key) > limits.max_label_chars or len(value) > limits.max_label_chars:
            raise ValidationError("labels", f"entry {key[:40]!r} is longer than {limits.max_label_chars}")


def _check_times(request: GenerationRequest, limits: RequestLimits, now_ms: int | None) -> None:
    created_at = request.created_at
    if isinstance(created_at, bool) or not isinstance(created_at, int) or created_at <= 0:
        raise ValidationError("created_at", "must be epoch milliseconds")
    if now_ms is not None and created_at > now_ms + FUTURE_SKEW_MS:
        raise ValidationError("created_at", "is more than an hour in the future")
    deadline = request.deadline_ms
    if deadline is not None and not created_at < deadline <= created_at + limits.max_deadline_ms:
        raise ValidationError(
            "deadline_ms", f"must be after created_at and within {limits.max_deadline_ms} ms"
        )


def _check_reply_topic(request: GenerationRequest, reply_prefix: Callable[[str], str] | None) -> None:
    reply_topic = request.reply_topic
    if reply_topic is None:
        return
    if not TOPIC_PATTERN.fullmatch(reply_topic) or reply_topic in (".", ".."):
        raise ValidationError("reply_topic", "is not a valid topic name")
    if reply_prefix is not None:
        prefix = reply_prefix(request.tenant_id)
        if not (reply_topic == prefix or reply_topic.startswith(prefix + ".")):
            raise ValidationError("reply_topic", f"must be {prefix} or start with {prefix}.")


def check_webhook_url(url: Any, field: str = "webhook_url") -> None:
    """An absolute http(s) URL with a host, at most `MAX_WEBHOOK_URL_CHARS`, no credentials, no spaces or
    control characters (``INVALID_WEBHOOK_URL``). Where it may point (no private addresses) is the
    delivery stage's check, made when it resolves the host."""
    if not isinstance(url, str) or not url:
        raise ValidationError(field, "must be a non-empty http or https URL")
    if len(url) > MAX_WEBHOOK_URL_CHARS:
        raise ValidationError(field, f"is {len(url)} characters, more than {MAX_WEBHOOK_URL_CHARS}")
    if _CONTROL.search(url) or any(c.isspace() for c in url):
        raise ValidationError(field, "contains spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise ValidationError(field, f"is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValidationError(field, f"must use http or https, not {parts.scheme or 'no scheme'!r}")
    if not parts.hostname:
        raise ValidationError(field, "has no host")
    if parts.username is not None or parts.password is not None:
        raise ValidationError(field, "must not carry credentials (user:password@)")
    if port == 0:
        raise ValidationError(field, "has port 0")


def render_cost(request: GenerationRequest) -> int:
    """Render cost in pixel-steps: frames x steps x width x height (the unit of the cost token bucket)."""
    video = request.video
    frames = video.num_frames if request.kind == "VIDEO" and video else request.num_images
    return int(frames) * int(request.steps) * int(request.width) * int(request.height)
