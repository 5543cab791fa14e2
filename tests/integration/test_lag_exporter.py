"""The lag exporter against a real broker: a group that stopped consuming shows lag, and none once it has
consumed; a render topic nobody took from shows share-group backlog."""

from __future__ import annotations

import time

from confluent_kafka import TopicPartition
from prometheus_client.registry import CollectorRegistry

from plumbing.kafka_clients import make_consumer, make_producer, renderer_group
from plumbing.lag_exporter import LagExporter
from plumbing.settings import Settings
from plumbing.topics import Topics


def produce(settings: Settings, topic: str, count: int) -> None:
    producer = make_producer(settings, "lag-test")
    for i in range(count):
        producer.produce(topic, f"m{i}".encode(), partition=0)
    assert producer.flush(30) == 0


def lag_of(exporter: LagExporter, group: str, topic: str) -> int | None:
    rows = [lag.messages for lag in exporter.refresh().lags if lag.group == group and lag.topic == topic]
    return sum(rows) if rows else None


def test_lag_of_a_stopped_consumer_then_none_after_it_consumed(isolated: Settings) -> None:
    topics = Topics(isolated)
    group = f"{isolated.kafka.topic_prefix}.lagtest"
    consumer = make_consumer(isolated, group, "lag-test")
    try:
        # The group starts at offset 0 of the status topic, then stops consuming while work arrives.
        consumer.commit(offsets=[TopicPartition(topics.status, 0, 0)], asynchronous=False)
        produce(isolated, topics.status, 5)
        exporter = LagExporter(isolated)
        assert lag_of(exporter, group, topics.status) == 5

        consumer.assign([TopicPartition(topics.status, 0, 0)])
        taken = 0
        deadline = time.monotonic() + 30
        while taken < 5 and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                taken += 1
        assert taken == 5
        consumer.commit(offsets=[TopicPartition(topics.status, 0, 5)], asynchronous=False)
        assert lag_of(exporter, group, topics.status) == 0

        registry = CollectorRegistry()
        registry.register(exporter)
        labels = {"group": group, "topic": topics.status, "partition": "0", "priority": ""}
        assert registry.get_sample_value("aigc_consumer_lag_messages", labels) == 0
    finally:
        consumer.close()


def test_share_group_backlog_of_untaken_render_tasks(isolated: Settings) -> None:
    topics = Topics(isolated)
    topic = topics.render("default", "HIGH")
    produce(isolated, topic, 3)
    exporter = LagExporter(isolated)
    exporter.refresh()
    share = renderer_group(isolated, "default", share=True)
    assert (share, topic, 3) in exporter.snapshot.backlogs
    registry = CollectorRegistry()
    registry.register(exporter)
    labels = {"group": share, "topic": topic, "priority": "HIGH"}
    assert registry.get_sample_value("aigc_share_group_backlog_messages", labels) == 3
    # Renderers record how far they took each partition under the pool's consumer-group name.
    progress = make_consumer(isolated, renderer_group(isolated, "default", share=False), "lag-test")
    try:
        progress.commit(offsets=[TopicPartition(topic, 0, 3)], asynchronous=False)
    finally:
        progress.close()
    exporter.refresh()
    assert (share, topic, 0) in exporter.snapshot.backlogs
