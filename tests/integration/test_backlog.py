"""The backlog monitor against a real broker: log-end offsets minus the renderer group's commits."""

from __future__ import annotations

from confluent_kafka import TopicPartition

from plumbing.kafka_clients import OffsetReader, make_consumer, make_producer
from plumbing.settings import Settings
from plumbing.topics import Topics
from stream_processors.gatekeeper.backlog import BacklogMonitor


def test_backlog_is_what_the_renderer_group_has_not_committed(isolated: Settings):
    settings = isolated.model_copy(
        update={"gatekeeper": isolated.gatekeeper.model_copy(update={"shed_backlog": {"LOW": 5}})}
    )
    topic = Topics(settings).render("default", "LOW")
    producer = make_producer(settings, "test")
    for i in range(12):
        producer.produce(topic, b"task", key=f"r{i}".encode(), partition=0)
    producer.flush(10)
    # The renderer group has finished (committed) four of them.
    group = make_consumer(settings, f"{settings.kafka.topic_prefix}.renderer.default", "test")
    group.commit(offsets=[TopicPartition(topic, 0, 4)], asynchronous=False)
    group.close()

    monitor = BacklogMonitor(settings)
    monitor.refresh(OffsetReader(settings))
    backlog = monitor.backlog("default", "LOW")
    assert backlog is not None and backlog.tasks == 8
    assert monitor.overloaded("default", "LOW") is not None  # 8 waiting > bound 5
    assert monitor.overloaded("default", "HIGH") is None  # no bound for HIGH
    assert monitor.backlog("default", "HIGH").tasks == 0  # type: ignore[union-attr]
