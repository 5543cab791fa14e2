"""The SDK's request builder: a typed GenerationRequest with the defaults filled in, left to validation."""

from __future__ import annotations

import pytest

from plumbing.errors import ValidationError
from plumbing.settings import RequestLimits
from plumbing.validation import validate_request
from producers.client import new_request
from schemas.codec import default_codec
from schemas.records import GenerationRequest, VideoSpec

FIELDS = dict(
    tenant_id="acme", prompt="a fox", model="tiny-sd", width=64, height=64, steps=4, guidance_scale=7.5
)


def test_new_request_fills_in_id_time_kind_and_the_schema_defaults():
    a, b = new_request(**FIELDS), new_request(**FIELDS)
    assert isinstance(a, GenerationRequest) and a.request_id != b.request_id and len(a.request_id) == 32
    assert (a.kind, a.priority, a.num_images, a.labels, a.video, a.output_format) == (
        "IMAGE", "NORMAL", 1, {}, None, None
    )  # fmt: skip
    assert a.created_at > 1_700_000_000_000
    validate_request(a, RequestLimits(), ["tiny-sd"])
    assert default_codec().read(default_codec().write(a), GenerationRequest) == a


def test_a_video_given_as_a_mapping_becomes_a_video_spec_and_a_video_request():
    r = new_request(**FIELDS, video={"num_frames": 8, "fps": 8})
    assert r.kind == "VIDEO" and r.video == VideoSpec(num_frames=8, fps=8)


@pytest.mark.parametrize(
    ("leave_out", "field"), [("prompt", "prompt"), ("width", "width"), ("steps", "steps"), ("model", "model")]
)
def test_a_required_field_left_out_is_named_by_validation(leave_out: str, field: str):
    fields = {k: v for k, v in FIELDS.items() if k != leave_out}
    with pytest.raises(ValidationError) as err:
        validate_request(new_request(**fields), RequestLimits(), ["tiny-sd"])
    assert err.value.field == field


def test_a_video_without_frames_is_named_by_validation():
    with pytest.raises(ValidationError) as err:
        validate_request(new_request(**FIELDS, video={"fps": 8}), RequestLimits(), ["tiny-sd"])
    assert err.value.field == "video.num_frames"


def test_an_unknown_field_is_refused():
    with pytest.raises(TypeError):
        new_request(**FIELDS, colour="red")
