"""The retry relay on a real broker: holds each envelope until due, without holding anything else."""

from __future__ import annotations

import threading
import time

import pytest

from plumbing.clock import now_ms
from plumbing.dead_letters import Original
from plumbing.errors import RetryableError
from plumbing.headers import ATTEMPTS, FIRST_FAILED_AT, ORIGIN
from plumbing.kafka_clients import header_map, make_consumer, make_producer, produce_sync
from plumbing.retries import route_failure
from plumbing.settings import Settings
from plumbing.topics import Stage, Topics
from schemas.codec import default_codec
from stream_processors.relay import Relay
from tests.conftest import unique

WAIT_S = 20.0


@pytest.fixture
def relay(isolated: Settings):
    stop = threading.Event()
    relay = Relay(isolated)
    thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    thread.start()
    yield relay
    stop.set()
    thread.join(15)


def retry_of(settings: Settings, value: bytes, offset: int, failed_at: int) -> bytes:
    """The RetryEnvelope a stage makes on its first failure (due one delay after ``failed_at``)."""
    original = Original(
        Topics(settings).frames("NORMAL"), 0, offset, 0, b"req", value, [("traceparent", b"t")]
    )
    routed = route_failure(
        default_codec(),
        Topics(settings),
        settings.retry,
        Stage.ASSEMBLER,
        original,
        RetryableError("blip"),
        failed_at,
    )
    assert routed is not None and not routed.dead
    return routed.value


def test_envelopes_go_back_when_due_with_attempts_and_origin(isolated: Settings, relay: Relay):
    topics = Topics(isolated)
    producer = make_producer(isolated, "test")
    retry_topic = topics.retry(Stage.ASSEMBLER, isolated.retry.delays_s[0])  # 1 s
    sent_at = time.monotonic()
    produce_sync(
        producer, retry_topic, retry_of(isolated, b"payload-1", 7, now_ms()), key=b"req", partition=0
    )
    consumer = make_consumer(isolated, unique("g"), "test")
    consumer.subscribe([topics.frames("NORMAL")])
    got = None
    deadline = time.monotonic() + WAIT_S
    while got is None and time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is not None and not msg.error():
            got = msg
    consumer.close()
    assert got is not None, "the relay never sent the message back"
    assert time.monotonic() - sent_at >= 0.9  # held until due (1 s after the failure)
    assert got.value() == b"payload-1" and got.key() == b"req"
    headers = header_map(got)
    assert headers[ATTEMPTS] == b"1" and int(headers[FIRST_FAILED_AT]) > 0
    assert headers[ORIGIN] == f"{topics.frames('NORMAL')}:0:7".encode()
    assert headers["traceparent"] == b"t"


def test_a_waiting_envelope_holds_only_its_own_partition(isolated: Settings, relay: Relay):
    topics = Topics(isolated)
    producer = make_producer(isolated, "test")
    retry_topic = topics.retry(Stage.ASSEMBLER, isolated.retry.delays_s[0])  # 1 s after each failure
    now = now_ms()
    produce_sync(
        producer, retry_topic, retry_of(isolated, b"later", 1, now + 9_000), partition=0
    )  # due in 10 s
    produce_sync(producer, retry_topic, retry_of(isolated, b"sooner", 2, now - 1_000), partition=1)  # due now
    consumer = make_consumer(isolated, unique("g"), "test")
    consumer.subscribe([topics.frames("NORMAL")])
    arrivals: dict[bytes, float] = {}
    start = time.monotonic()
    while len(arrivals) < 2 and time.monotonic() - start < WAIT_S:
        msg = consumer.poll(0.2)
        if msg is not None and not msg.error():
            arrivals[msg.value()] = time.monotonic() - start
    consumer.close()
    assert set(arrivals) == {b"sooner", b"later"}
    assert arrivals[b"sooner"] < 5.0 <= arrivals[b"later"]


def test_a_waiting_envelope_is_relayed_after_its_partition_moves_away_and_back(
    isolated: Settings, relay: Relay
):
    """Another member joins the relay's group and leaves: partitions move to it and back while the relay
    holds an envelope in each (a session lost in a broker outage does the same). librdkafka keeps a
    partition paused across its revocation, so a relay that forgets why it paused a partition must also
    resume it: every envelope still comes back. The other member consumes nothing, so it relays nothing."""
    topics = Topics(isolated)
    retry_topic = topics.retry(Stage.ASSEMBLER, isolated.retry.delays_s[0])
    producer = make_producer(isolated, "test")
    partitions = len(producer.list_topics(retry_topic, timeout=10).topics[retry_topic].partitions)
    now = now_ms()
    for p in range(partitions):  # each due in 5 s
        value = retry_of(isolated, f"held-{p}".encode(), p, now + 4_000)
        produce_sync(producer, retry_topic, value, partition=p)
    deadline = time.monotonic() + WAIT_S
    while len(relay.waiting) < partitions and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(relay.waiting) == partitions, "the relay did not hold every partition"

    member = make_consumer(isolated, f"{isolated.kafka.topic_prefix}.relay", "test")
    member.subscribe(list(relay.stage_of))
    deadline = time.monotonic() + 60
    while not member.assignment() and time.monotonic() < deadline:
        member.poll(0.2)
    moved = {(tp.topic, tp.partition) for tp in member.assignment()}
    member.close()  # leaves the group: its partitions go back to the relay
    assert moved, "no partition moved to the other member"

    consumer = make_consumer(isolated, unique("g"), "test")
    consumer.subscribe([topics.frames("NORMAL")])
    arrived: set[bytes] = set()
    deadline = time.monotonic() + 60
    while len(arrived) < partitions and time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is not None and not msg.error():
            arrived.add(msg.value())
    consumer.close()
    assert arrived == {f"held-{p}".encode() for p in range(partitions)}, f"{len(moved)} partitions moved"
