"""Request validation names the field at fault with a reason code, and accepts what is valid."""

from __future__ import annotations

import pytest

from plumbing.errors import ValidationError
from plumbing.settings import RequestLimits
from plumbing.validation import render_cost, validate_request
from schemas.records import GenerationRequest, VideoSpec

LIMITS = RequestLimits()
MODELS = {"tiny-sd"}
NOW = 1_800_000_000_000


def request(**fields):
    base = dict(
        request_id="req-1",
        kind="VIDEO" if fields.get("video") else "IMAGE",
        tenant_id="acme",
        prompt="a lighthouse at dusk",
        model="tiny-sd",
        width=64,
        height=64,
        steps=4,
        guidance_scale=7.5,
        created_at=NOW,
    )
    if fields.get("video") is not None:
        fields["video"] = VideoSpec(**fields["video"])
    return GenerationRequest(**{**base, **fields})


def video(**video_fields):
    return request(kind="VIDEO", video={"num_frames": 16, "fps": 8, **video_fields})


def check(req, reply_prefix=lambda tenant: f"aigc.reply.{tenant}"):
    validate_request(req, LIMITS, MODELS, reply_prefix, now_ms=NOW)


def test_valid_image_and_video_pass():
    check(request())
    check(request(num_images=8, output_format="JPEG", scheduler="euler", labels={"a": "b"}))
    check(video(prompt_end="a lighthouse at night", seed_end=3))
    check(request(reply_topic="aigc.reply.acme"))
    check(request(reply_topic="aigc.reply.acme.results"))


@pytest.mark.parametrize(
    ("fields", "field", "code"),
    [
        ({"request_id": "../etc/passwd"}, "request_id", "INVALID_REQUEST_ID"),
        ({"request_id": "x" * 65}, "request_id", "INVALID_REQUEST_ID"),
        ({"request_id": "a\x00b"}, "request_id", "INVALID_REQUEST_ID"),
        ({"request_id": "ｒｅｑ"}, "request_id", "INVALID_REQUEST_ID"),
        ({"tenant_id": "/abs"}, "tenant_id", "INVALID_TENANT_ID"),
        ({"prompt": "   "}, "prompt", "INVALID_PROMPT"),
        ({"prompt": "x" * 4001}, "prompt", "INVALID_PROMPT"),
        ({"prompt": "cat\x07"}, "prompt", "INVALID_PROMPT"),
        ({"model": "sdxl"}, "model", "UNKNOWN_MODEL"),
        ({"width": 65}, "width", "INVALID_WIDTH"),
        ({"height": 4096}, "height", "INVALID_HEIGHT"),
        ({"width": -64}, "width", "INVALID_WIDTH"),
        ({"steps": 0}, "steps", "INVALID_STEPS"),
        ({"guidance_scale": float("nan")}, "guidance_scale", "INVALID_GUIDANCE_SCALE"),
        ({"num_images": 9}, "num_images", "INVALID_NUM_IMAGES"),
        ({"scheduler": "warp"}, "scheduler", "INVALID_SCHEDULER"),
        ({"output_format": "MP4"}, "output_format", "INVALID_OUTPUT_FORMAT"),
        ({"kind": "IMAGE", "video": {"num_frames": 4, "fps": 8}}, "video", "INVALID_VIDEO"),
        ({"reply_topic": "aigc.reply.other"}, "reply_topic", "INVALID_REPLY_TOPIC"),
        ({"reply_topic": "aigc.reply.acme/../x"}, "reply_topic", "INVALID_REPLY_TOPIC"),
        ({"deadline_ms": NOW - 1}, "deadline_ms", "INVALID_DEADLINE_MS"),
        ({"created_at": NOW + 2 * 3600 * 1000}, "created_at", "INVALID_CREATED_AT"),
        ({"labels": {str(i): "v" for i in range(33)}}, "labels", "INVALID_LABELS"),
    ],
)
def test_invalid_image_requests_name_the_field(fields, field, code):
    with pytest.raises(ValidationError) as err:
        check(request(**fields))
    assert err.value.field == field
    assert err.value.code == code
    assert field in str(err.value)


@pytest.mark.parametrize(
    ("video_fields", "field"),
    [
        ({"num_frames": 1}, "video.num_frames"),
        ({"num_frames": 257}, "video.num_frames"),
        ({"fps": 0}, "video.fps"),
        ({"prompt_end": "dusk\x00"}, "video.prompt_end"),
    ],
)
def test_invalid_videos_name_the_nested_field(video_fields, field):
    with pytest.raises(ValidationError) as err:
        check(video(**video_fields))
    assert err.value.field == field
    assert err.value.code == "INVALID_" + field.upper().replace(".", "_")


def test_video_request_needs_a_video_spec():
    with pytest.raises(ValidationError) as err:
        check(request(kind="VIDEO"))
    assert err.value.field == "video"


def test_model_check_can_be_skipped_by_clients_without_the_registry():
    validate_request(request(model="sdxl"), LIMITS, None, None, NOW)


def test_render_cost_counts_frames_steps_and_pixels():
    assert render_cost(request(num_images=2)) == 2 * 4 * 64 * 64
    assert render_cost(video()) == 16 * 4 * 64 * 64


@pytest.mark.parametrize(
    "url", ["https://hooks.example.com/aigc?x=1", "http://127.0.0.1:8080/hook", "https://[2001:db8::1]/h"]
)
def test_a_webhook_url_that_is_an_http_url_passes(url):
    check(request(webhook_url=url))


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://hooks.example.com/aigc", "http or https"),
        ("hooks.example.com/aigc", "http or https"),
        ("https:///path-only", "no host"),
        ("https://user:pw@hooks.example.com/", "credentials"),
        ("https://hooks.example.com:99999/", "not a URL"),
        ("https://hooks.example.com/a b", "spaces"),
        ("https://hooks.example.com/\x00", "control"),
        ("https://hooks.example.com/" + "a" * 2100, "more than 2048"),
        ("", "non-empty"),
    ],
)
def test_a_bad_webhook_url_is_rejected_naming_the_field(url, says):
    with pytest.raises(ValidationError) as err:
        check(request(webhook_url=url))
    assert err.value.field == "webhook_url" and err.value.code == "INVALID_WEBHOOK_URL"
    assert says in str(err.value)
