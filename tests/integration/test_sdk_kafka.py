"""The SDK against a real broker: Avro requests keyed by tenant on the priority's topic, acknowledged."""

from __future__ import annotations

import threading
import time

import pytest

from plumbing.clock import now_ms
from plumbing.errors import ValidationError
from plumbing.headers import trace_id
from plumbing.kafka_clients import header_map, make_consumer, make_producer, produce_sync
from plumbing.settings import Settings
from plumbing.topics import PRIORITIES, Topics
from producers.client import Client, new_request, retry_transient
from schemas.codec import default_codec
from schemas.records import CancelRequest, Completion, GenerationRequest, Timings
from tests.conftest import unique

DRAIN_TIMEOUT_S = 20.0


def drain(settings: Settings, topics: list[str], expected: int) -> list:
    """Consume ``topics`` from the beginning until ``expected`` messages arrived or the timeout passed."""
    consumer = make_consumer(settings, unique("g"), "test")
    consumer.subscribe(topics)
    seen = []
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    try:
        while len(seen) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                seen.append(msg)
    finally:
        consumer.close()
    return seen


def fields(**extra):
    base = dict(
        tenant_id="acme",
        prompt="a paper boat on a pond",
        model="tiny-sd",
        width=64,
        height=64,
        steps=4,
        guidance_scale=7.0,
    )
    return {**base, **extra}


def test_submit_produces_avro_keyed_by_tenant_on_the_priority_topic(isolated: Settings):
    topics = Topics(isolated)
    with Client(isolated) as client:
        ids = {p: client.submit(**fields(priority=p.value)) for p in PRIORITIES}
    messages = drain(isolated, [topics.requests(p) for p in PRIORITIES], expected=3)
    assert len(messages) == 3
    by_id = {default_codec().read(m.value(), GenerationRequest).request_id: m for m in messages}
    assert set(by_id) == set(ids.values())
    for priority, request_id in ids.items():
        msg = by_id[request_id]
        assert msg.topic() == topics.requests(priority)
        assert msg.key() == b"acme"
        headers = header_map(msg)
        assert headers["request_id"] == request_id.encode()
        assert headers["tenant_id"] == b"acme"
        assert trace_id(headers["traceparent"]) is not None


def test_submit_takes_a_built_request_with_fields_set_on_it(isolated: Settings):
    request = new_request(**fields(request_id=f"built-{now_ms()}"))
    with Client(isolated) as client:
        request_id = client.submit(request, priority="HIGH")
    assert request_id == request.request_id
    [msg] = drain(isolated, [Topics(isolated).requests("HIGH")], expected=1)
    sent = default_codec().read(msg.value(), GenerationRequest)
    assert sent.priority == "HIGH" and sent.prompt == request.prompt and sent.created_at == request.created_at


def test_invalid_request_is_refused_before_anything_is_sent(isolated: Settings):
    with Client(isolated) as client, pytest.raises(ValidationError) as err:
        client.submit(**fields(width=70))
    assert err.value.field == "width"
    assert end_offsets(isolated, Topics(isolated).requests("NORMAL")) == 0


def end_offsets(settings: Settings, topic: str) -> int:
    """Messages ever written to ``topic`` (sum of high watermarks)."""
    from confluent_kafka import TopicPartition

    consumer = make_consumer(settings, unique("g"), "test")
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions

        def high(p: int) -> int:
            tp = TopicPartition(topic, p)
            return retry_transient(lambda: consumer.get_watermark_offsets(tp, timeout=10))[1]

        return sum(high(p) for p in partitions)
    finally:
        consumer.close()


def test_submit_nowait_and_flush_deliver_everything(isolated: Settings):
    with Client(isolated) as client:
        ids = [client.submit_nowait(**fields(labels={"n": str(i)})) for i in range(200)]
        client.flush()
    messages = drain(isolated, [Topics(isolated).requests("NORMAL")], expected=200)
    decoded = [default_codec().read(m.value(), GenerationRequest).request_id for m in messages]
    assert sorted(decoded) == sorted(ids)


def completion(request_id: str, tenant: str = "acme") -> Completion:
    return Completion(
        request_id=request_id,
        tenant_id=tenant,
        status="SUCCEEDED",
        timings=Timings(queued_ms=1, render_ms=2, assemble_ms=3, total_ms=6),
        finished_at=now_ms(),
    )


def test_wait_finds_a_completion_that_arrived_before_or_after_the_call(isolated: Settings):
    topics = Topics(isolated)
    producer = make_producer(isolated, "test")
    codec = default_codec()
    with Client(isolated) as client:
        early = client.submit(**fields())
        produce_sync(producer, topics.completions, codec.write(completion(early)), key=early)
        found = client.wait(early, timeout_s=20)
        assert isinstance(found, Completion) and (found.request_id, found.timings.total_ms) == (early, 6)

        late = client.submit(**fields())
        timer = threading.Timer(
            1.0,
            lambda: produce_sync(producer, topics.completions, codec.write(completion(late)), key=late),
        )
        timer.start()
        assert client.wait(late, timeout_s=20).status == "SUCCEEDED"
        timer.join()


def test_a_completion_written_while_a_wait_starts_is_not_skipped(isolated: Settings):
    """The race a loaded machine hit: no completion yet when the start offsets are looked up, one
    written before the consumer's first fetch. The start must be a concrete offset, not "the end"."""
    topics = Topics(isolated)
    producer = make_producer(isolated, "test")
    codec = default_codec()
    with Client(isolated) as client:
        produce_sync(producer, topics.completions, codec.write(completion("before")), key="before")
        consumer = make_consumer(isolated, unique("g"), "test")
        try:
            positions = client._start_positions(consumer, [topics.completions], now_ms() + 500, False)
            time.sleep(0.6)  # the completion is written after since_ms, before any fetch
            produce_sync(producer, topics.completions, codec.write(completion("racer")), key="racer")
            consumer.assign(positions)
            seen = []
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while "racer" not in seen and time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is not None and not msg.error():
                    seen.append(codec.read(msg.value(), Completion).request_id)
        finally:
            consumer.close()
    assert seen == ["racer"]


def test_subscribe_filters_by_tenant_and_skips_garbage(isolated: Settings):
    topics = Topics(isolated)
    producer = make_producer(isolated, "test")
    codec = default_codec()
    start = now_ms()
    produce_sync(producer, topics.completions, b"\x00garbage", key=b"x")
    for i, tenant in enumerate(["acme", "globex", "acme"]):
        produce_sync(producer, topics.completions, codec.write(completion(f"r{i}", tenant)))
    with Client(isolated) as client:
        events = list(client.subscribe(tenant_id="acme", status=False, since_ms=start - 1000, timeout_s=3))
    # completions are keyed by request, so r0 and r2 may sit on different partitions in either order
    assert sorted(e.request_id for e in events) == ["r0", "r2"]
    assert all(e.kind == "completion" and isinstance(e.record, Completion) for e in events)
    assert {e.record.tenant_id for e in events} == {"acme"}


def test_cancel_writes_a_compacted_cancellation(isolated: Settings):
    with Client(isolated) as client:
        client.cancel("req-9", "acme", "changed my mind")
    [msg] = drain(isolated, [Topics(isolated).cancellations], expected=1)
    assert msg.key() == b"req-9"
    cancel = default_codec().read(msg.value(), CancelRequest)
    assert (cancel.request_id, cancel.tenant_id, cancel.reason) == ("req-9", "acme", "changed my mind")
