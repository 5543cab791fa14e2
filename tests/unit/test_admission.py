"""The gatekeeper's admission decision (`Gate.admit`) over real encoded requests and plain-dict tables.

Tables are applied between calls the way the faust agent in ``stream_processors/gatekeeper/app.py`` does,
through `TypedTable` over plain dicts of JSON objects (what faust stores).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from plumbing.dead_letters import Original
from plumbing.headers import REPLY_TOPIC, TRACEPARENT, Outgoing, pipeline_headers, trace_id
from plumbing.settings import (
    MODERATION_CATEGORIES,
    GatekeeperSettings,
    KafkaSettings,
    ModelSpec,
    RequestLimits,
    Settings,
    Tier,
)
from plumbing.topics import Stage, Topics
from plumbing.validation import render_cost
from schemas.codec import default_codec
from schemas.records import (
    Completion,
    DeadLetter,
    GenerationRequest,
    Header,
    ModerationVerdict,
    RenderTask,
    StatusEvent,
    Timings,
    VideoSpec,
)
from stream_processors.gatekeeper.admission import Admission, Gate
from stream_processors.gatekeeper.fanout import plan_tasks
from stream_processors.gatekeeper.moderation import DEFAULT_POLICY_PATH, Moderator, Policy, build_moderator
from stream_processors.gatekeeper.tables import Bucket, Seen, TypedTable

NOW = 1_700_000_000_000
WINDOW_S = 60.0
FRAMES_PER_TASK = 4
POOL = "gpu-a"
TENANT = "tenant-a"
LIMITED = "tenant-limited"  # burst of one request, one token per 100 s
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING_TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
SMALL_COST = 64 * 64 * 4  # the cost of one default test image

codec = default_codec()
policy = Policy.from_file(DEFAULT_POLICY_PATH)


def make_settings() -> Settings:
    return Settings.load(
        # Several render partitions, as classic-mode renderers need: a video's tasks are spread over them.
        kafka=KafkaSettings(topic_prefix="aigc", render_partitions=16),
        limits=RequestLimits(),
        models={"tiny-sd": ModelSpec(path=Path("/models/tiny-sd"), pool=POOL, backend="synthetic")},
        reply_topic_prefixes={},
        gatekeeper=GatekeeperSettings(
            dedupe_window_s=WINDOW_S,
            frames_per_task=FRAMES_PER_TASK,
            tiers={
                "standard": Tier(),
                "tiny": Tier(requests_per_s=0.01, request_burst=1.0, cost_per_s=1e9, cost_burst=1e9),
                "cheap": Tier(cost_per_s=1.0, cost_burst=SMALL_COST * 2),
            },
            tenant_tiers={LIMITED: "tiny", "tenant-cheap": "cheap"},
        ),
    )


SETTINGS = make_settings()
TOPICS = Topics(SETTINGS)


def make_gate(is_cancelled: Callable[[str, str], bool] | None = None) -> Gate:
    moderator = Moderator(policy)
    if is_cancelled is None:
        return Gate(SETTINGS, codec, moderator)
    return Gate(SETTINGS, codec, moderator, is_cancelled)


def request(**fields: Any) -> GenerationRequest:
    base: dict[str, Any] = {
        "request_id": "req-1",
        "tenant_id": TENANT,
        "kind": "VIDEO" if fields.get("video") else "IMAGE",
        "prompt": "a lighthouse at dusk",
        "model": "tiny-sd",
        "width": 64,
        "height": 64,
        "steps": 4,
        "guidance_scale": 7.5,
        "seed": 42,
        "created_at": NOW - 1_000,
    }
    if fields.get("video") is not None:
        fields["video"] = VideoSpec(**fields["video"])
    return GenerationRequest(**{**base, **fields})


def original(
    record: GenerationRequest, offset: int = 0, partition: int = 0, value: bytes | None = None
) -> Original:
    headers: list[tuple[str, bytes | None]] = [
        (k, v if isinstance(v, bytes) or v is None else v.encode())
        for k, v in pipeline_headers(record.request_id, record.tenant_id, INCOMING_TRACEPARENT)
    ]
    return Original(
        TOPICS.requests(record.priority),
        partition,
        offset,
        NOW - 500,
        record.tenant_id.encode(),
        codec.write(record) if value is None else value,
        headers,
    )


class Tables:
    """The gatekeeper's two tables as plain dicts of JSON objects, updated like the faust agent does."""

    def __init__(self) -> None:
        self.seen: TypedTable[Seen] = TypedTable({}, Seen)
        self.buckets: TypedTable[Bucket] = TypedTable({}, Bucket)

    def admit(self, gate: Gate, message: Original, now_ms: int = NOW) -> Admission:
        admission = gate.admit(message, self.seen, self.buckets, now_ms)
        if admission.seen is not None and admission.request_id:
            self.seen[admission.request_id] = replace(admission.seen, partition=message.partition)
        if admission.bucket is not None and admission.tenant_id:
            self.buckets[admission.tenant_id] = admission.bucket
        return admission


def only_decision(admission: Admission) -> tuple[Outgoing, Completion]:
    """The single Completion on the decisions topic, decoded."""
    assert len(admission.outputs) == 1
    out = admission.outputs[0]
    assert out.topic in TOPICS.all_decisions()
    return out, codec.read(out.value, Completion)


def header(out: Outgoing, name: str) -> Any:
    values = [v for k, v in out.headers if k == name]
    assert len(values) <= 1, f"{name} appears {len(values)} times"
    return values[0] if values else None


def assert_continues_trace(out: Outgoing, request_id: str) -> None:
    parent = header(out, TRACEPARENT)
    assert trace_id(parent) == TRACE_ID
    assert parent != INCOMING_TRACEPARENT.encode()  # a new span of the same trace
    assert header(out, "request_id") == request_id.encode()


# -- decoding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (b"\x00not avro at all", "BAD_MARKER"),
        (b"", "EMPTY"),
        (b"\xc3\x01" + b"\x00" * 8 + b"body", "UNKNOWN_SCHEMA"),
    ],
)
def test_undecodable_bytes_are_dead_lettered_untouched(value: bytes, code: str) -> None:
    tables = Tables()
    message = original(request(), offset=17, value=value)
    admission = tables.admit(make_gate(), message)
    assert admission.verdict == "DEAD_LETTERED"
    assert admission.reason == code
    assert (admission.seen, admission.bucket) == (None, None)
    assert (tables.seen, tables.buckets) == ({}, {})
    assert len(admission.outputs) == 1
    out = admission.outputs[0]
    assert out.topic == TOPICS.dlq(Stage.GATEKEEPER)
    assert out.key == message.key
    letter = codec.read(out.value, DeadLetter)
    assert letter.value == value
    assert letter.key == message.key
    assert letter.original_topic == message.topic
    assert letter.original_offset == 17
    assert letter.stage == Stage.GATEKEEPER.value
    assert letter.error_code == code
    assert letter.headers == [Header(key=k, value=v) for k, v in message.headers]
    names = [k for k, _ in out.headers]
    assert names[: len(message.headers)] == [k for k, _ in message.headers]
    assert header(out, "dlq.original.topic") == message.topic.encode()
    assert header(out, "dlq.original.offset") == b"17"
    assert header(out, "dlq.error.code") == code.encode()
    assert header(out, "dlq.stage") == b"gatekeeper"


def test_a_record_of_another_schema_is_dead_lettered() -> None:
    completion = Completion(
        request_id="r", tenant_id="t", status="FAILED", timings=Timings(), finished_at=NOW
    )
    value = codec.write(completion)
    admission = Tables().admit(make_gate(), original(request(), value=value))
    assert admission.verdict == "DEAD_LETTERED"
    assert admission.reason == "WRONG_SCHEMA"
    assert codec.read(admission.outputs[0].value, DeadLetter).value == value


# -- validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "code", "field"),
    [
        ({"width": 65}, "INVALID_WIDTH", "width"),
        ({"steps": 0}, "INVALID_STEPS", "steps"),
        ({"model": "no-such-model"}, "UNKNOWN_MODEL", "model"),
        ({"reply_topic": "aigc.reply.someone-else"}, "INVALID_REPLY_TOPIC", "reply_topic"),
        (
            {"kind": "VIDEO", "video": {"num_frames": 1, "fps": 8}},
            "INVALID_VIDEO_NUM_FRAMES",
            "video.num_frames",
        ),
    ],
)
def test_an_invalid_request_is_rejected_naming_the_field(
    fields: dict[str, Any], code: str, field: str
) -> None:
    tables = Tables()
    record = request(**fields)
    admission = tables.admit(make_gate(), original(record))
    assert admission.verdict == "REJECTED"
    assert admission.reason == code
    out, completion = only_decision(admission)
    assert out.key == b"req-1"
    assert completion.status == "REJECTED"
    assert completion.reason_code == code
    assert completion.message is not None and field in completion.message
    assert completion.finished_at == NOW
    assert completion.timings.total_ms == 1_000
    assert completion.outputs == []
    assert header(out, REPLY_TOPIC) is None
    assert_continues_trace(out, "req-1")
    # The decision is remembered, and no tokens were taken.
    assert not tables.seen["req-1"].accepted
    assert tables.buckets == {}


@pytest.mark.parametrize("bad", ["not valid!", "", "../etc/passwd", "x" * 70_000, "ｒｅｑ"])
def test_a_request_without_a_usable_id_is_dead_lettered_intact_and_not_remembered(bad: str) -> None:
    tables = Tables()
    message = original(request(request_id=bad))
    admission = tables.admit(make_gate(), message)
    assert admission.verdict == "DEAD_LETTERED"
    assert admission.reason == "INVALID_REQUEST_ID"
    [out] = admission.outputs
    assert out.topic == TOPICS.dlq(Stage.GATEKEEPER)
    assert codec.read(out.value, DeadLetter).value == message.value
    assert tables.seen == {}


def test_labels_are_echoed_on_a_decision() -> None:
    admission = Tables().admit(make_gate(), original(request(width=65, labels={"user": "u7"})))
    assert only_decision(admission)[1].labels == {"user": "u7"}


def test_the_webhook_url_of_a_valid_request_travels_with_its_tasks_not_that_of_an_invalid_one() -> None:
    hook = "https://hooks.example.com/aigc"
    valid_but_rejected = Tables().admit(make_gate(), original(request(prompt="", webhook_url=hook)))
    assert only_decision(valid_but_rejected)[1].webhook_url is None  # invalid (prompt): not carried
    tables, gate = Tables(), make_gate()
    tasks = tables.admit(gate, original(request(webhook_url=hook)))
    assert {codec.read(o.value, RenderTask).webhook_url for o in tasks.outputs if "render" in o.topic} == {
        hook
    }


def test_a_rejection_of_a_valid_request_carries_its_webhook_url() -> None:
    hook = "https://hooks.example.com/aigc"
    tables, gate = Tables(), make_gate()
    for offset in range(60):  # over the tier's burst: RATE_LIMITED, a rejection of a valid request
        admission = tables.admit(
            gate, original(request(request_id=f"r-{offset}", webhook_url=hook), offset=offset)
        )
        if admission.reason == "RATE_LIMITED":
            break
    assert admission.reason == "RATE_LIMITED"
    assert only_decision(admission)[1].webhook_url == hook


# -- cancellation and deadlines ---------------------------------------------------------------------


def test_a_request_cancelled_before_admission_is_cancelled() -> None:
    asked: list[tuple[str, str]] = []

    def cancelled(request_id: str, tenant_id: str) -> bool:
        asked.append((request_id, tenant_id))
        return request_id == "req-1"

    tables = Tables()
    gate = make_gate(cancelled)
    admission = tables.admit(gate, original(request()))
    assert admission.verdict == "CANCELLED"
    _, completion = only_decision(admission)
    assert (completion.status, completion.reason_code) == ("CANCELLED", "CANCELLED")
    assert asked == [("req-1", TENANT)]
    assert tables.buckets == {}  # nothing charged
    # Another request of the same tenant is not affected.
    assert tables.admit(gate, original(request(request_id="req-2"), offset=1)).verdict == "ACCEPTED"


@pytest.mark.parametrize("deadline", [NOW, NOW - 1])
def test_a_request_past_its_deadline_expires(deadline: int) -> None:
    tables = Tables()
    admission = tables.admit(make_gate(), original(request(deadline_ms=deadline)))
    assert admission.verdict == "EXPIRED"
    _, completion = only_decision(admission)
    assert (completion.status, completion.reason_code) == ("EXPIRED", "DEADLINE_EXCEEDED")
    assert tables.buckets == {}


def test_a_request_before_its_deadline_is_accepted() -> None:
    admission = Tables().admit(make_gate(), original(request(deadline_ms=NOW + 1)))
    assert admission.verdict == "ACCEPTED"


# -- moderation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": "a battlefield full of gore"}, "prompt"),
        ({"negative_prompt": "gore"}, "negative_prompt"),
        (
            {"kind": "VIDEO", "video": {"num_frames": 4, "fps": 8, "prompt_end": "a beheading"}},
            "video.prompt_end",
        ),
    ],
)
def test_a_blocked_text_is_rejected_as_moderated(fields: dict[str, Any], field: str) -> None:
    tables = Tables()
    admission = tables.admit(make_gate(), original(request(**fields)))
    assert admission.verdict == "REJECTED"
    assert admission.reason == "MODERATED"
    _, completion = only_decision(admission)
    assert completion.reason_code == "MODERATED"
    assert completion.moderation == ModerationVerdict(
        category="violence_gore",
        policy_version=policy.version,
        source="policy",
        field=field,
        reason="VIOLENCE_GORE",
        model_version=None,
        score=None,
        scores={},
    )
    assert completion.message is not None and field in completion.message
    assert tables.buckets == {}  # moderation comes before the rate limiter


def test_a_model_decision_carries_the_model_version_score_and_scores() -> None:
    # The gatekeeper's own moderator (shipped policy and model): "naked" is only a cue, so the model
    # decides, and the Completion says which model, with what score, over which categories.
    gate = Gate(SETTINGS, codec, build_moderator(SETTINGS.gatekeeper))
    admission = Tables().admit(gate, original(request(prompt="a nude figure")))
    _, completion = only_decision(admission)
    verdict = completion.moderation
    assert verdict is not None
    assert (verdict.category, verdict.reason, verdict.source) == ("sexual", "SEXUAL_CONTENT", "prompt-linear")
    assert verdict.model_version is not None and verdict.model_version.startswith("prompt-linear-")
    assert (
        verdict.score
        == max(verdict.scores.values())
        >= SETTINGS.gatekeeper.moderation_cue_thresholds["sexual"]
    )
    assert set(verdict.scores) == set(MODERATION_CATEGORIES)


# -- rate limits ------------------------------------------------------------------------------------


def test_a_tenant_over_its_rate_is_rejected_with_retry_after() -> None:
    tables = Tables()
    gate = make_gate()
    first = tables.admit(gate, original(request(tenant_id=LIMITED), offset=0))
    assert first.verdict == "ACCEPTED"
    bucket = tables.buckets[LIMITED]
    second = tables.admit(gate, original(request(request_id="req-2", tenant_id=LIMITED), offset=1))
    assert second.verdict == "REJECTED"
    assert second.reason == "RATE_LIMITED"
    assert second.bucket is None
    assert tables.buckets[LIMITED] == bucket  # the refusal took nothing
    _, completion = only_decision(second)
    assert completion.reason_code == "RATE_LIMITED"
    # 0.01 request tokens/s: one token is back after 100 s.
    assert completion.retry_after_ms == 100_000
    # Other tenants have their own buckets.
    assert tables.admit(gate, original(request(request_id="req-3"), offset=2)).verdict == "ACCEPTED"
    # After the retry-after, the tenant is admitted again.
    later = tables.admit(
        gate, original(request(request_id="req-4", tenant_id=LIMITED), offset=3), NOW + 100_000
    )
    assert later.verdict == "ACCEPTED"


def test_the_cost_bucket_is_charged_with_the_render_cost() -> None:
    tables = Tables()
    record = request(tenant_id="tenant-cheap", num_images=2)
    assert tables.admit(make_gate(), original(record)).verdict == "ACCEPTED"
    tier = SETTINGS.gatekeeper.tiers["cheap"]
    assert tables.buckets["tenant-cheap"].cost == tier.cost_burst - render_cost(record)
    again = tables.admit(
        make_gate(), original(request(request_id="req-2", tenant_id="tenant-cheap"), offset=1)
    )
    assert again.reason == "RATE_LIMITED"


def test_a_request_costlier_than_the_tier_allows_is_rejected_for_good() -> None:
    tables = Tables()
    record = request(tenant_id="tenant-cheap", num_images=3)  # 3 images > a burst of 2
    admission = tables.admit(make_gate(), original(record))
    assert admission.verdict == "REJECTED"
    assert admission.reason == "COST_EXCEEDS_TIER"
    _, completion = only_decision(admission)
    assert completion.reason_code == "COST_EXCEEDS_TIER"
    assert completion.retry_after_ms is None
    assert tables.buckets == {}


# -- acceptance -------------------------------------------------------------------------------------


@pytest.mark.parametrize("priority", ["HIGH", "NORMAL", "LOW"])
def test_an_accepted_image_request_fans_out_on_its_pool_and_priority(priority: str) -> None:
    tables = Tables()
    record = request(priority=priority, num_images=3)
    admission = tables.admit(make_gate(), original(record, offset=5, partition=2))
    assert admission.verdict == "ACCEPTED"
    assert (admission.request_id, admission.tenant_id) == ("req-1", TENANT)
    first, *tasks, last = admission.outputs
    statuses = [codec.read(first.value, StatusEvent), codec.read(last.value, StatusEvent)]
    assert [first.topic, last.topic] == [TOPICS.status, TOPICS.status]
    assert [s.state for s in statuses] == ["ACCEPTED", "QUEUED"]
    assert all(s.stage == "gatekeeper" and s.at == NOW for s in statuses)
    assert all((s.progress, s.task_id, s.worker_id) == (None, None, None) for s in statuses)
    assert statuses[0].message is None
    render_topic = TOPICS.render(POOL, priority)
    assert render_topic == f"aigc.render.{POOL}.{priority.lower()}"
    assert statuses[1].message == f"3 task(s) on {render_topic}"
    assert len(tasks) == 3
    assert all(out.topic == render_topic for out in tasks)
    decoded = [codec.read(out.value, RenderTask) for out in tasks]
    assert decoded == plan_tasks(record, POOL, FRAMES_PER_TASK, NOW, NOW)
    assert [t.priority for t in decoded] == [priority] * 3
    for out in admission.outputs:
        assert out.key == b"req-1"
        assert_continues_trace(out, "req-1")
        assert header(out, "tenant_id") == TENANT.encode()
    origin = f"{TOPICS.requests(priority)}:2:5"
    assert tables.seen["req-1"] == Seen(origin=origin, first_seen=NOW, decision=None, partition=2)
    assert tables.buckets[TENANT].requests == SETTINGS.gatekeeper.tiers["standard"].request_burst - 1


def test_an_accepted_video_is_split_into_tasks_of_frames_per_task() -> None:
    record = request(kind="VIDEO", video={"num_frames": 10, "fps": 8})
    admission = Tables().admit(make_gate(), original(record))
    tasks = [codec.read(o.value, RenderTask) for o in admission.outputs if o.topic.startswith("aigc.render")]
    assert len(tasks) == math.ceil(10 / FRAMES_PER_TASK)
    assert [(t.frame_start, t.frame_end) for t in tasks] == [(0, 4), (4, 8), (8, 10)]


@pytest.mark.parametrize("request_id", ["req-1", "a", "video-0042"])
def test_the_tasks_of_one_request_go_to_distinct_partitions_under_its_key(request_id: str) -> None:
    # One partition has one renderer: a video's frame ranges must spread to render side by side.
    record = request(request_id=request_id, kind="VIDEO", video={"num_frames": 10, "fps": 8})
    outputs = [
        o for o in Tables().admit(make_gate(), original(record)).outputs if o.topic.startswith("aigc.render")
    ]
    partitions = [o.partition for o in outputs]
    assert len(outputs) == 3 and len(set(partitions)) == 3
    assert all(p is not None and 0 <= p < SETTINGS.kafka.render_partitions for p in partitions)
    assert {o.key for o in outputs} == {request_id.encode()}
    # spaced evenly: with a contiguous run of partitions per renderer, each run gets its share
    assert sorted((p - partitions[0]) % SETTINGS.kafka.render_partitions for p in partitions) == [
        i * (SETTINGS.kafka.render_partitions // 3) for i in range(3)
    ]
    lone = Tables().admit(make_gate(), original(request(request_id=request_id)))
    assert [o.partition for o in lone.outputs if o.topic.startswith("aigc.render")] == [None]


def test_a_missing_or_broken_traceparent_starts_a_new_trace() -> None:
    record = request()
    message = original(record)
    broken = Original(
        message.topic, 0, 0, NOW, message.key, message.value, [(TRACEPARENT, b"garbage"), ("x", None)]
    )
    admission = Tables().admit(make_gate(), broken)
    assert admission.verdict == "ACCEPTED"
    assert all(trace_id(header(out, TRACEPARENT)) not in (None, TRACE_ID) for out in admission.outputs)


# -- deduplication and redelivery -------------------------------------------------------------------


def test_a_duplicate_request_id_at_another_offset_is_dropped() -> None:
    tables = Tables()
    gate = make_gate()
    assert tables.admit(gate, original(request(), offset=0)).verdict == "ACCEPTED"
    seen, buckets = dict(tables.seen), dict(tables.buckets)
    # Same request_id, even with other content, at another offset inside the window.
    dup = tables.admit(gate, original(request(prompt="something else"), offset=9), NOW + 1_000)
    assert dup.verdict == "DUPLICATE"
    assert dup.outputs == []
    assert (dup.seen, dup.bucket) == (None, None)
    assert tables.seen == seen and tables.buckets == buckets


def test_a_duplicate_of_a_rejected_request_is_dropped_too() -> None:
    tables = Tables()
    gate = make_gate()
    assert tables.admit(gate, original(request(width=65), offset=0)).verdict == "REJECTED"
    assert tables.admit(gate, original(request(), offset=1), NOW + 1).verdict == "DUPLICATE"


def test_the_same_request_id_after_the_window_is_processed_again() -> None:
    tables = Tables()
    gate = make_gate()
    window_ms = int(WINDOW_S * 1000)
    assert tables.admit(gate, original(request(), offset=0)).verdict == "ACCEPTED"
    just_inside = tables.admit(gate, original(request(), offset=1), NOW + window_ms - 1)
    assert just_inside.verdict == "DUPLICATE"
    after = tables.admit(gate, original(request(), offset=2), NOW + window_ms)
    assert after.verdict == "ACCEPTED"
    assert len(after.outputs) == 3
    assert tables.seen["req-1"].origin.endswith(":0:2")
    assert tables.seen["req-1"].first_seen == NOW + window_ms


def test_a_redelivered_accepted_request_is_accepted_again_without_charging_the_tenant() -> None:
    tables = Tables()
    gate = make_gate()
    message = original(request(tenant_id=LIMITED), offset=3)
    first = tables.admit(gate, message)
    assert first.verdict == "ACCEPTED"
    bucket = tables.buckets[LIMITED]
    # The same origin again (a crash before the offset was committed). With a burst of one, a second
    # charge would be refused.
    again = tables.admit(gate, message, NOW + 10)
    assert again.verdict == "ACCEPTED"
    assert again.bucket is None
    assert tables.buckets[LIMITED] == bucket
    first_tasks = [codec.read(o.value, RenderTask) for o in first.outputs[1:-1]]
    again_tasks = [codec.read(o.value, RenderTask) for o in again.outputs[1:-1]]
    assert [(t.task_id, t.recipe) for t in again_tasks] == [(t.task_id, t.recipe) for t in first_tasks]
    # The tenant's one token really is spent: a new request is refused.
    other = tables.admit(gate, original(request(request_id="req-2", tenant_id=LIMITED), offset=4), NOW + 20)
    assert other.reason == "RATE_LIMITED"


def test_a_redelivered_rejection_is_decided_again_not_dropped() -> None:
    tables = Tables()
    gate = make_gate()
    message = original(request(width=65), offset=3)
    assert tables.admit(gate, message).verdict == "REJECTED"
    again = tables.admit(gate, message, NOW + 10)
    assert again.verdict == "REJECTED"
    assert only_decision(again)[1].reason_code == "INVALID_WIDTH"


# -- reply topics -----------------------------------------------------------------------------------


def test_a_decision_carries_a_valid_reply_topic_header() -> None:
    reply = f"aigc.reply.{TENANT}.results"
    admission = Tables().admit(make_gate(), original(request(prompt="gore", reply_topic=reply)))
    assert admission.reason == "MODERATED"
    out, _ = only_decision(admission)
    assert header(out, REPLY_TOPIC) == reply.encode()


def test_a_validation_failure_never_carries_the_reply_topic_header() -> None:
    reply = f"aigc.reply.{TENANT}"
    admission = Tables().admit(make_gate(), original(request(width=65, reply_topic=reply)))
    assert admission.reason == "INVALID_WIDTH"
    out, _ = only_decision(admission)
    assert header(out, REPLY_TOPIC) is None


def test_accepted_outputs_carry_no_reply_topic_header() -> None:
    admission = Tables().admit(make_gate(), original(request(reply_topic=f"aigc.reply.{TENANT}")))
    assert admission.verdict == "ACCEPTED"
    assert all(header(out, REPLY_TOPIC) is None for out in admission.outputs)
    task = codec.read(admission.outputs[1].value, RenderTask)
    assert task.reply_topic == f"aigc.reply.{TENANT}"


def decided(admission: Admission) -> Completion:
    [out] = admission.outputs
    assert out.topic in TOPICS.all_decisions()
    return codec.read(out.value, Completion)


def test_a_redelivered_rejection_replays_the_same_decision_even_after_the_bucket_refilled():
    tables, gate = Tables(), make_gate()
    tables.admit(gate, original(request(request_id="first", tenant_id=LIMITED), offset=1))
    throttled = original(request(request_id="second", tenant_id=LIMITED), offset=2)
    first = tables.admit(gate, throttled)
    assert first.verdict == "REJECTED" and first.reason == "RATE_LIMITED"
    # Much later the bucket is full again, but this is the same message after a crash: same answer.
    again = tables.admit(gate, throttled, now_ms=NOW + 1_000_000)
    assert again.verdict == "REJECTED" and again.reason == "RATE_LIMITED"
    assert decided(again).retry_after_ms == decided(first).retry_after_ms
    assert all(out.topic != TOPICS.render(POOL, "NORMAL") for out in again.outputs)


def test_a_redelivered_acceptance_stays_accepted_after_its_deadline_or_a_cancellation():
    tables = Tables()
    message = original(request(request_id="late", deadline_ms=NOW + 10_000), offset=3)
    assert tables.admit(make_gate(), message).verdict == "ACCEPTED"
    cancelled_now = make_gate(is_cancelled=lambda request_id, tenant_id: True)
    again = tables.admit(cancelled_now, message, now_ms=NOW + 60_000)
    assert (
        again.verdict == "ACCEPTED"
    )  # its tasks are already on the render topic; stages downstream skip them
    assert tables.seen["late"].accepted


def test_a_redelivery_does_not_extend_the_dedupe_window():
    tables, gate = Tables(), make_gate()
    message = original(request(request_id="once"), offset=4)
    tables.admit(gate, message)
    tables.admit(gate, message, now_ms=NOW + 30_000)
    assert tables.seen["once"].first_seen == NOW


def test_an_overloaded_class_is_shed_with_a_retry_after_and_no_tokens_taken() -> None:
    shed = {(POOL, "LOW"): 3_000}
    gate = Gate(
        SETTINGS, codec, Moderator(policy), overloaded=lambda pool, priority: shed.get((pool, priority))
    )
    tables = Tables()
    low = tables.admit(
        gate, original(request(request_id="low-1", tenant_id=LIMITED, priority="LOW"), offset=1)
    )
    assert (low.verdict, low.reason) == ("REJECTED", "OVERLOADED")
    assert only_decision(low)[1].retry_after_ms == 3_000
    assert tables.buckets == {}  # shed before the token buckets: nothing charged
    high = tables.admit(
        gate, original(request(request_id="high-1", tenant_id=LIMITED, priority="HIGH"), offset=2)
    )
    assert high.verdict == "ACCEPTED"


def test_a_tenant_at_its_in_flight_cap_is_told_to_come_back_and_is_not_charged() -> None:
    busy_tenants = {LIMITED}
    gate = Gate(
        SETTINGS, codec, Moderator(policy), busy=lambda tenant, priority, tasks: tenant in busy_tenants
    )
    tables = Tables()
    busy = tables.admit(gate, original(request(request_id="busy-1", tenant_id=LIMITED), offset=1))
    assert (busy.verdict, busy.reason) == ("REJECTED", "TENANT_BUSY")
    retry_after_ms = only_decision(busy)[1].retry_after_ms
    assert retry_after_ms is not None and retry_after_ms > 0
    assert tables.buckets == {}
    assert tables.admit(gate, original(request(request_id="free-1"), offset=2)).verdict == "ACCEPTED"


@pytest.mark.parametrize("priority", ["HIGH", "NORMAL", "LOW"])
def test_a_decision_goes_to_its_class_s_decisions_topic(priority: str) -> None:
    """The sink takes terminal work most urgent class first, so a rejection travels in its request's class."""
    admission = Tables().admit(make_gate(), original(request(priority=priority, steps=0)))
    out, completion = only_decision(admission)
    assert completion.status == "REJECTED"
    assert out.topic == TOPICS.decisions(priority)


# -- tables written before their values had names ---------------------------------------------------


def test_a_redelivery_replays_a_rejection_stored_in_the_old_single_letter_shape() -> None:
    message = original(request(request_id="old", tenant_id=LIMITED), offset=7)
    # A RATE_LIMITED rejection as the gatekeeper stored it before (``{**seen, "p": partition}``).
    old = {
        "o": message.origin,
        "t": NOW - 5_000,
        "d": "R",
        "x": {
            "status": "REJECTED",
            "reason_code": "RATE_LIMITED",
            "message": "the tenant is over its rate limit; retry later",
            "validated": True,
            "retry_after_ms": 1_234,
        },
        "p": 0,
    }
    admission = make_gate().admit(message, TypedTable({"old": old}, Seen), TypedTable({}, Bucket), NOW)
    assert (admission.verdict, admission.reason) == ("REJECTED", "RATE_LIMITED")
    assert decided(admission).retry_after_ms == 1_234
    assert admission.seen is not None and admission.seen.first_seen == NOW - 5_000


def test_old_single_letter_entries_still_dedupe_and_rate_limit() -> None:
    accepted = {"o": "aigc.requests.normal:0:1", "t": NOW - 1_000, "d": "A", "p": 0}
    empty = {"r": 0.0, "c": 1e9, "t": float(NOW)}  # LIMITED's bucket with no request token left
    seen, buckets = TypedTable({"req-1": accepted}, Seen), TypedTable({LIMITED: empty}, Bucket)
    gate = make_gate()
    assert gate.admit(original(request(), offset=2), seen, buckets, NOW).verdict == "DUPLICATE"
    limited = gate.admit(original(request(request_id="req-2", tenant_id=LIMITED)), seen, buckets, NOW)
    assert limited.reason == "RATE_LIMITED"
