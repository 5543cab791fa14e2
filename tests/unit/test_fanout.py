"""Fan-out of an accepted request into RenderTasks: seeds, frame ranges, positions, defaults, encoding."""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import pytest

from schemas.codec import default_codec
from schemas.records import GenerationRequest, LatentRecipe, RenderTask, VideoSpec
from stream_processors.gatekeeper.fanout import INT64_MAX, derive_seed, output_format, plan_tasks

INT64_MIN = -(2**63)
POOL = "gpu-a"
ACCEPTED_AT = 1_700_000_000_100
ENQUEUED_AT = 1_700_000_000_200


def image_request(**fields: Any) -> GenerationRequest:
    base: dict[str, Any] = {
        "request_id": "req-img",
        "tenant_id": "tenant-a",
        "kind": "VIDEO" if fields.get("video") else "IMAGE",
        "prompt": "a lighthouse at dusk",
        "model": "tiny-sd",
        "width": 64,
        "height": 64,
        "steps": 4,
        "guidance_scale": 7.5,
        "created_at": 1_700_000_000_000,
    }
    if fields.get("video") is not None:
        fields["video"] = VideoSpec(**fields["video"])
    return GenerationRequest(**{**base, **fields})


def video_request(num_frames: int, **fields: Any) -> GenerationRequest:
    video = {"num_frames": num_frames, "fps": 8, **fields.pop("video", {})}
    return image_request(request_id="req-vid", kind="VIDEO", video=video, **fields)


def plan(request: GenerationRequest, frames_per_task: int = 4) -> list[RenderTask]:
    return plan_tasks(request, POOL, frames_per_task, ACCEPTED_AT, ENQUEUED_AT)


def test_an_image_request_becomes_one_task_per_image_with_consecutive_seeds() -> None:
    tasks = plan(image_request(seed=1000, num_images=3))
    assert [t.task_id for t in tasks] == ["req-img.0", "req-img.1", "req-img.2"]
    assert [(t.frame_start, t.frame_end) for t in tasks] == [(0, 1), (1, 2), (2, 3)]
    assert all(t.frame_count == 3 for t in tasks)
    assert [t.recipe for t in tasks] == [
        LatentRecipe(seed_start=1000 + j, seed_end=1000 + j, positions=[0.0]) for j in range(3)
    ]
    assert all(t.seed == 1000 for t in tasks)
    assert all(t.kind == "IMAGE" and t.fps is None and t.prompt_end is None for t in tasks)


def test_image_seeds_wrap_inside_a_signed_64_bit_long() -> None:
    tasks = plan(image_request(seed=INT64_MAX - 1, num_images=3))
    assert [t.recipe.seed_start for t in tasks] == [INT64_MAX - 1, INT64_MAX, INT64_MIN]
    for task in tasks:
        default_codec().write(task)


def test_the_request_fields_are_copied_onto_every_task() -> None:
    request = image_request(
        seed=5,
        num_images=2,
        priority="HIGH",
        negative_prompt="blurry",
        scheduler="euler",
        reply_topic="aigc.reply.tenant-a",
        labels={"user": "u1"},
        deadline_ms=1_700_000_060_000,
    )
    for task in plan(request):
        assert task.request_id == "req-img"
        assert task.tenant_id == "tenant-a"
        assert task.priority == "HIGH"
        assert task.pool == POOL
        assert (task.model, task.width, task.height, task.steps) == ("tiny-sd", 64, 64, 4)
        assert task.guidance_scale == 7.5
        assert task.scheduler == "euler"
        assert task.negative_prompt == "blurry"
        assert task.reply_topic == "aigc.reply.tenant-a"
        assert task.labels == {"user": "u1"}
        assert task.created_at == 1_700_000_000_000
        assert task.accepted_at == ACCEPTED_AT
        assert task.enqueued_at == ENQUEUED_AT
        assert task.deadline_ms == 1_700_000_060_000
        assert task.attempt == 0


def test_labels_are_copied_not_shared() -> None:
    request = image_request(labels={"a": "1"})
    first, second = plan(dataclasses.replace(request, num_images=2))
    first.labels["b"] = "2"
    assert request.labels == {"a": "1"}
    assert second.labels == {"a": "1"}


@pytest.mark.parametrize(
    ("frames", "per_task"), [(2, 4), (4, 4), (5, 4), (9, 4), (10, 3), (16, 1), (17, 16), (256, 4)]
)
def test_video_tasks_cover_every_frame_once_in_order(frames: int, per_task: int) -> None:
    tasks = plan(video_request(frames, seed=7), per_task)
    assert len(tasks) == math.ceil(frames / per_task)
    covered = [i for t in tasks for i in range(t.frame_start, t.frame_end)]
    assert covered == list(range(frames))
    for task in tasks:
        assert 0 < task.frame_end - task.frame_start <= per_task
        assert task.task_id == f"req-vid.{task.frame_start}"
        assert task.frame_count == frames
        assert len(task.recipe.positions) == task.frame_end - task.frame_start


@pytest.mark.parametrize("frames", [2, 3, 7, 10, 49, 256])
def test_video_positions_run_from_zero_to_exactly_one(frames: int) -> None:
    tasks = plan(video_request(frames, seed=7), 3)
    positions = [p for t in tasks for p in t.recipe.positions]
    assert positions[0] == 0.0
    assert positions[-1] == 1.0
    assert positions == [i / (frames - 1) for i in range(frames)]
    assert all(a < b for a, b in itertools.pairwise(positions))


def test_video_recipe_walks_from_seed_to_seed_end() -> None:
    tasks = plan(video_request(6, seed=100, video={"seed_end": 999, "prompt_end": "a storm"}))
    assert all(t.recipe.seed_start == 100 and t.recipe.seed_end == 999 for t in tasks)
    assert all(t.prompt_end == "a storm" and t.fps == 8 for t in tasks)


def test_video_seed_end_defaults_to_seed_plus_one() -> None:
    tasks = plan(video_request(6, seed=100))
    assert all(t.recipe.seed_end == 101 for t in tasks)


def test_video_seed_end_wraps_at_the_top_of_int64() -> None:
    tasks = plan(video_request(6, seed=INT64_MAX))
    assert all(t.recipe.seed_start == INT64_MAX for t in tasks)
    assert all(t.recipe.seed_end == INT64_MIN for t in tasks)
    for task in tasks:
        default_codec().write(task)


def test_derive_seed_is_deterministic_non_negative_and_distinct() -> None:
    ids = [f"req-{i}" for i in range(500)]
    seeds = [derive_seed(i) for i in ids]
    assert seeds == [derive_seed(i) for i in ids]
    assert all(0 <= s <= INT64_MAX for s in seeds)
    assert len(set(seeds)) == len(seeds)
    # The top bit is masked, not the whole value: seeds use the full 63 bits.
    assert max(seeds) > 2**62


def test_a_request_without_seed_uses_the_derived_seed() -> None:
    request = image_request(seed=None, num_images=2)
    expected = derive_seed("req-img")
    tasks = plan(request)
    assert [t.seed for t in tasks] == [expected, expected]
    assert [t.recipe.seed_start for t in tasks] == [expected, expected + 1]
    video = plan(video_request(4, seed=None))
    assert video[0].recipe.seed_start == derive_seed("req-vid")


def test_seed_zero_is_a_seed_not_a_missing_one() -> None:
    assert plan(image_request(seed=0))[0].recipe.seed_start == 0


@pytest.mark.parametrize(
    ("kind_fields", "given", "expected"),
    [
        ({}, None, "PNG"),
        ({}, "JPEG", "JPEG"),
        ({"kind": "VIDEO", "video": {"num_frames": 2, "fps": 8}}, None, "MP4"),
        ({"kind": "VIDEO", "video": {"num_frames": 2, "fps": 8}}, "MP4", "MP4"),
    ],
)
def test_output_format_defaults_by_kind(
    kind_fields: dict[str, Any], given: str | None, expected: str
) -> None:
    request = image_request(output_format=given, **kind_fields)
    assert output_format(request) == expected
    assert all(t.output_format == expected for t in plan(request))


def test_priority_defaults_to_normal() -> None:
    assert plan(image_request())[0].priority == "NORMAL"


@pytest.mark.parametrize(
    "request_fields",
    [
        {"seed": 3, "num_images": 8, "negative_prompt": "x", "scheduler": "ddim"},
        {"seed": None, "kind": "VIDEO", "video": {"num_frames": 13, "fps": 24, "prompt_end": "end"}},
        {"seed": INT64_MAX, "kind": "VIDEO", "video": {"num_frames": 2, "fps": 1}},
    ],
)
def test_every_task_encodes_and_round_trips_with_the_real_codec(request_fields: dict[str, Any]) -> None:
    codec = default_codec()
    for task in plan(image_request(**request_fields)):
        decoded = codec.read(codec.write(task), RenderTask)
        assert decoded == task


def test_planning_is_deterministic_across_calls() -> None:
    for request in (image_request(seed=None, num_images=4), video_request(11, seed=None)):
        first = plan(request, 4)
        again = plan(dataclasses.replace(request), 4)
        assert first == again
        codec = default_codec()
        assert [codec.write(t) for t in first] == [codec.write(t) for t in again]
