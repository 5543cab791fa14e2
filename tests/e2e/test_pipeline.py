"""The product end to end on real Kafka, Cassandra and S3: requests in, stored results and completions out."""

from __future__ import annotations

import hashlib
import urllib.request
import uuid

import pytest

from infra.bootstrap import ensure_topics
from plumbing.blobs import BlobStore
from plumbing.kafka_clients import make_producer, produce_sync
from plumbing.metadata import connect, register_types
from plumbing.settings import Settings
from plumbing.topics import Topics, TopicSpec
from producers.client import Client, new_request
from schemas.codec import default_codec
from stream_processors.assembler.video import decode_png, probe_video
from tests.e2e.conftest import collect, completions_of


@pytest.fixture(params=["share", "classic"])
def pipeline(request: pytest.FixtureRequest) -> Settings:
    """Each test of this module against both renderer modes: share groups and classic consumer groups."""
    return request.getfixturevalue(f"{request.param}_pipeline")


def rid(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def image(**fields):
    base = dict(
        tenant_id="acme",
        prompt="a paper lantern floating on a lake",
        model="tiny-sd",
        width=64,
        height=64,
        steps=4,
        guidance_scale=7.5,
    )
    return {**base, **fields}


def row_of(settings: Settings, request_id: str):
    ks = settings.cassandra.keyspace
    cluster, session = connect(settings.cassandra)
    try:
        register_types(cluster, ks)
        return session.execute(f"SELECT * FROM {ks}.requests WHERE request_id = %s", (request_id,)).one()
    finally:
        cluster.shutdown()


def produce_raw(settings: Settings, record: dict) -> None:
    """What another team's service would do: encode and produce, without the SDK's client-side checks."""
    producer = make_producer(settings, "e2e-raw")
    produce_sync(
        producer,
        Topics(settings).requests(record["priority"]),
        default_codec().encode("GenerationRequest", record),
        key=record["tenant_id"],
    )


def test_image_request_yields_pngs_a_row_and_a_working_presigned_url(pipeline: Settings):
    request_id = rid("img")
    with Client(pipeline) as client:
        client.submit(**image(request_id=request_id, num_images=2, width=96, height=64))
    [completion] = completions_of(pipeline, {request_id})
    assert completion["status"] == "SUCCEEDED", completion
    assert len(completion["outputs"]) == 2
    blobs = BlobStore(pipeline.s3)
    for output in completion["outputs"]:
        assert output["content_type"] == "image/png"
        bucket, _, key = output["uri"].removeprefix("s3://").partition("/")
        assert bucket == pipeline.s3.results_bucket
        assert key.startswith("acme/") and f"/{request_id}/" in key
        pixels = decode_png(blobs.get(bucket, key))
        assert pixels.shape == (64, 96, 3)
        with urllib.request.urlopen(output["presigned_url"], timeout=10) as resp:
            assert hashlib.sha256(resp.read()).hexdigest() == output["sha256"]
    timings = completion["timings"]
    assert timings["total_ms"] >= timings["render_ms"] > 0
    row = row_of(pipeline, request_id)
    assert row.status == "SUCCEEDED" and row.tenant_id == "acme" and row.width == 96
    assert [o.key for o in row.outputs] == [o["uri"].split("/", 3)[3] for o in completion["outputs"]]
    assert BlobStore(pipeline.s3).list_keys(pipeline.s3.staging_bucket, f"acme/{request_id}/") == []


def test_video_request_yields_an_mp4_matching_the_request(pipeline: Settings):
    request_id = rid("vid")
    with Client(pipeline) as client:
        client.submit(
            **image(
                request_id=request_id, video={"num_frames": 16, "fps": 8, "prompt_end": "the lantern at dawn"}
            )
        )
    [completion] = completions_of(pipeline, {request_id})
    assert completion["status"] == "SUCCEEDED", completion
    [output] = completion["outputs"]
    assert output["content_type"] == "video/mp4"
    assert (output["frames"], output["fps"], output["duration_ms"]) == (16, 8, 2000)
    bucket, _, key = output["uri"].removeprefix("s3://").partition("/")
    info = probe_video(BlobStore(pipeline.s3).get(bucket, key))
    assert (info.frames, info.fps, info.duration_ms, info.codec) == (16, 8.0, 2000, "h264")
    assert (info.width, info.height) == (64, 64)
    assert row_of(pipeline, request_id).frame_count == 16


def test_rejections_carry_the_reason_and_render_nothing(pipeline: Settings):
    moderated, invalid = rid("mod"), rid("bad")
    limited = [rid("lim"), rid("lim")]
    with Client(pipeline) as client:
        client.submit(**image(request_id=moderated, prompt="a g.o.r.e soaked battlefield"))
        for request_id in limited:
            client.submit(**image(request_id=request_id, tenant_id="limited-tenant"))
    # An invalid size can only arrive from a producer that skips the SDK's own validation.
    produce_raw(pipeline, new_request(**image(request_id=invalid, width=1030)).to_avro())
    ids = {moderated, invalid, *limited}
    by_id = {c["request_id"]: c for c in completions_of(pipeline, ids)}
    assert by_id[moderated]["status"] == "REJECTED"
    assert by_id[moderated]["reason_code"] == "MODERATED"
    assert by_id[moderated]["moderation"]["category"] == "violence_gore"
    assert by_id[invalid]["reason_code"] == "INVALID_WIDTH" and "width" in by_id[invalid]["message"]
    statuses = sorted((by_id[r]["status"], by_id[r]["reason_code"]) for r in limited)
    assert statuses == [("REJECTED", "RATE_LIMITED"), ("SUCCEEDED", None)]
    throttled = next(by_id[r] for r in limited if by_id[r]["reason_code"] == "RATE_LIMITED")
    assert throttled["retry_after_ms"] > 0
    rejected = {moderated, invalid, throttled["request_id"]}
    frames = collect(
        pipeline, Topics(pipeline).all_frames(), lambda r: r["request_id"] in rejected, lambda _: True
    )
    assert frames == []  # nothing was rendered for a rejected request
    assert row_of(pipeline, moderated).status == "REJECTED"


def test_a_duplicate_request_id_yields_exactly_one_completion(pipeline: Settings):
    request_id = rid("dup")
    with Client(pipeline) as client:
        client.submit(**image(request_id=request_id))
        client.submit(**image(request_id=request_id, prompt="the same id, different words"))
    completions = completions_of(pipeline, {request_id}, expected=1)
    assert len(completions) == 1
    assert completions[0]["status"] == "SUCCEEDED"


def test_a_reply_topic_gets_the_result(pipeline: Settings):
    topics = Topics(pipeline)
    reply = f"{topics.reply_prefix('acme')}.results"
    ensure_topics(pipeline, [TopicSpec(reply, "Completion", "request_id", 1)])
    request_id = rid("reply")
    with Client(pipeline) as client:
        client.submit(**image(request_id=request_id, reply_topic=reply))
    found = collect(
        pipeline,
        [reply, topics.completions],
        lambda r: r["request_id"] == request_id,
        lambda found: len(found) >= 2,
    )
    assert sorted(r["_topic"] for r in found) == sorted([reply, topics.completions])
    assert all(r["status"] == "SUCCEEDED" for r in found)
