"""Output moderation end to end on real Kafka, Cassandra and S3, with the real nudenet detector.

A pipeline of its own (synthetic renderer, so frames are drawn, not diffused) whose assembler counts
BUTTOCKS_EXPOSED from 0.3 as unsafe: nudenet genuinely scores the striped frame of seed 95 / "stripes 5"
about 0.36 on that label (see tests/integration/test_output_check.py), while seed 7 / "stripes 0" gets no
detection at all. So a request for the first is blocked by a real detector verdict and one for the
second is published as before; nothing here fakes the detector.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.pipeline import running_pipeline
from plumbing.blobs import BlobStore, result_prefix
from plumbing.kafka_clients import make_producer, produce_sync
from plumbing.settings import ModelSpec, Settings
from plumbing.topics import Topics
from producers.client import Client
from schemas.codec import default_codec
from schemas.records import ModerationVerdict
from stream_processors.assembler.store import moderation_verdict, ms
from tests.e2e.conftest import collect, completions_of
from tests.e2e.test_pipeline import row_of

SERVICE_MS = 20.0
FLAGGED = {"seed": 95, "prompt": "stripes 5"}
CLEAN = {"seed": 7, "prompt": "stripes 0"}
THRESHOLD = 0.3


def moderated_pipeline(
    infra: Settings, home: Path, name: str, renderer_env: dict[str, str] | None = None
) -> Iterator[Settings]:
    """A pipeline of its own (synthetic renderers) whose output check counts BUTTOCKS_EXPOSED from
    THRESHOLD as unsafe, quarantining to a bucket of its own."""
    settings = infra.model_copy(
        update={
            "home": home,
            "models": {"synth": ModelSpec(path=Path("/synthetic"), backend="synthetic")},
            "output_check": infra.output_check.model_copy(
                update={"unsafe_labels": {"BUTTOCKS_EXPOSED": THRESHOLD}}
            ),
            "assembler": infra.assembler.model_copy(
                update={"quarantine_bucket": f"quarantine-{uuid.uuid4().hex[:8]}"}
            ),
        }
    )
    with running_pipeline(
        settings,
        synthetic_ms=SERVICE_MS,
        isolate=name,
        drop=True,
        renderer_env=renderer_env,
        echo=lambda line: print(f"[{name}] {line}"),
    ) as pipe:
        yield pipe.settings


@pytest.fixture(scope="module")
def moderated(infra: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Renderers check their frames (the default)."""
    yield from moderated_pipeline(infra, tmp_path_factory.mktemp("outmod"), "outmod")


@pytest.fixture(scope="module")
def unchecked_renderers(infra: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Renderers with the check off: their frames reach the sink unchecked, and the sink checks them."""
    home = tmp_path_factory.mktemp("outmod-sink")
    yield from moderated_pipeline(infra, home, "outmodsink", {"AIGC_OUTPUT_CHECK__ENABLED": "false"})


def request(**fields: Any) -> dict[str, Any]:
    base = dict(tenant_id="acme", model="synth", width=512, height=512, steps=2, guidance_scale=7.5)
    return {**base, **fields}


def frames_record(settings: Settings, request_id: str) -> tuple[bytes, dict[str, Any]]:
    """The FramesRendered message of a one-task request, as the renderer produced it."""
    [found] = collect(
        settings,
        Topics(settings).all_frames(),
        lambda r: r["request_id"] == request_id,
        lambda f: len(f) >= 1,
    )
    found.pop("_topic")
    return default_codec().encode("FramesRendered", found), found


def test_a_detector_verdict_quarantines_the_output_and_a_clean_image_is_published(moderated: Settings):
    settings, blobs = moderated, BlobStore(moderated.s3)
    with Client(settings) as client:
        blocked = client.submit(**request(**FLAGGED))
        clean = client.submit(**request(**CLEAN))
        video = client.submit(**request(**FLAGGED, video={"num_frames": 6, "fps": 6}))
    by_id = {c["request_id"]: c for c in completions_of(settings, {blocked, clean, video})}
    assert len(by_id) == 3  # exactly one Completion each (collect waits idle for strays)

    published = by_id[clean]
    assert (published["status"], published["moderation"]) == ("SUCCEEDED", None), published
    # The renderers decided: their verdicts travel in FramesRendered, so the sink ran no detector.
    assert frames_record(settings, clean)[1]["output_check"]["blocked"] is None
    renderer_verdict = frames_record(settings, blocked)[1]["output_check"]
    assert renderer_verdict["blocked"]["reason"] == "BUTTOCKS_EXPOSED"
    assert renderer_verdict["blocked"]["frame_index"] == 0
    [output] = published["outputs"]
    assert output["uri"].startswith(f"s3://{settings.s3.results_bucket}/acme/")
    assert output["presigned_url"]

    for request_id, kind in ((blocked, "image"), (video, "video frame")):
        completion = by_id[request_id]
        assert (completion["status"], completion["reason_code"]) == ("REJECTED", "OUTPUT_MODERATED")
        assert completion["outputs"] == []
        assert f"{kind} 0 shows BUTTOCKS_EXPOSED" in completion["message"]
        verdict = completion["moderation"]
        assert (verdict["category"], verdict["field"], verdict["source"]) == ("sexual", "output", "nudenet")
        assert verdict["reason"] == "BUTTOCKS_EXPOSED"
        assert verdict["model_version"].startswith("nudenet-") and verdict["model_version"].endswith("/320n")
        assert THRESHOLD <= verdict["score"] < 0.5
        assert verdict["scores"]["BUTTOCKS_EXPOSED"] == verdict["score"]

        row = row_of(settings, request_id)
        assert (row.status, row.reason_code, row.outputs) == ("REJECTED", "OUTPUT_MODERATED", None)
        assert moderation_verdict(row.moderation) == ModerationVerdict.from_avro(verdict)
        prefix = result_prefix("acme", request_id, ms(row.created_at))
        assert row.moderation["quarantine"] == f"s3://{settings.assembler.quarantine_bucket}/{prefix}"
        frames = 6 if kind == "video frame" else 1
        expected = [f"{prefix}frame-{i:05d}.png" for i in range(frames)]
        assert sorted(blobs.list_keys(settings.assembler.quarantine_bucket, prefix)) == expected
        assert blobs.list_keys(settings.s3.results_bucket, prefix) == []
        assert blobs.list_keys(settings.s3.staging_bucket, f"acme/{request_id}/") == []
    clean_prefix = output["uri"].removeprefix(f"s3://{settings.s3.results_bucket}/").rsplit("/", 1)[0]
    assert blobs.list_keys(settings.assembler.quarantine_bucket, clean_prefix) == []


def test_a_redelivered_frames_message_publishes_nothing_more(moderated: Settings):
    settings = moderated
    with Client(settings) as client:
        blocked = client.submit(**request(**FLAGGED))
    [first] = completions_of(settings, {blocked})
    assert first["reason_code"] == "OUTPUT_MODERATED"
    value, record = frames_record(settings, blocked)
    frames_topic = Topics(settings).frames(record["priority"])
    produce_sync(make_producer(settings, "e2e-replay"), frames_topic, value, key=blocked.encode())
    # The copy is a new input for a request another input decided: the row stands, no second Completion.
    again = collect(
        settings,
        [Topics(settings).completions],
        lambda r: r["request_id"] == blocked,
        lambda found: len(found) >= 1,
    )
    assert len(again) == 1 and again[0]["finished_at"] == first["finished_at"]
    assert record["outcome"] == "RENDERED"
    assert row_of(settings, blocked).decided_by.startswith(frames_topic)


def test_frames_that_reach_the_sink_unchecked_are_checked_there(unchecked_renderers: Settings):
    settings, blobs = unchecked_renderers, BlobStore(unchecked_renderers.s3)
    with Client(settings) as client:
        blocked = client.submit(**request(**FLAGGED))
        clean = client.submit(**request(**CLEAN))
    by_id = {c["request_id"]: c for c in completions_of(settings, {blocked, clean})}
    assert frames_record(settings, blocked)[1]["output_check"] is None  # the renderer did not check
    assert (by_id[clean]["status"], by_id[clean]["moderation"]) == ("SUCCEEDED", None)
    completion = by_id[blocked]
    assert (completion["status"], completion["reason_code"]) == ("REJECTED", "OUTPUT_MODERATED")
    assert completion["moderation"]["reason"] == "BUTTOCKS_EXPOSED"
    assert completion["outputs"] == []
    row = row_of(settings, blocked)
    prefix = result_prefix("acme", blocked, ms(row.created_at))
    assert blobs.list_keys(settings.assembler.quarantine_bucket, prefix) == [f"{prefix}frame-00000.png"]
    assert blobs.list_keys(settings.s3.results_bucket, prefix) == []
