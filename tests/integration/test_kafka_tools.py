"""`aigc kafka groups | topics ...` runs Kafka's own admin tools against the configured (real) broker."""

from __future__ import annotations

import os
import subprocess
import sys

from confluent_kafka import TopicPartition
from confluent_kafka.admin import NewTopic

from plumbing.kafka_clients import make_admin, make_consumer, make_producer, produce_sync
from plumbing.settings import Settings
from tests.conftest import unique


def aigc(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings.to_env()}
    return subprocess.run([sys.executable, "-m", "aigc", *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip


def test_groups_and_topics_of_the_real_broker(infra: Settings) -> None:
    topic, group = f"{unique('tools')}.topic", unique("toolsgroup")
    admin = make_admin(infra)
    admin.create_topics([NewTopic(topic, 2, 1)])[topic].result(30)
    produce_sync(make_producer(infra, "tools-test"), topic, b"v", key=b"k")
    consumer = make_consumer(infra, group, "tools-test")
    consumer.commit(offsets=[TopicPartition(topic, 0, 1), TopicPartition(topic, 1, 0)], asynchronous=False)
    consumer.close()

    topics = aigc(infra, "kafka", "topics", "--list")
    assert topics.returncode == 0, topics.stderr
    assert topic in topics.stdout.split()

    described = aigc(infra, "kafka", "topics", "--describe", "--topic", topic)
    assert described.returncode == 0, described.stderr
    assert "PartitionCount: 2" in described.stdout

    groups = aigc(infra, "kafka", "groups", "--list")
    assert groups.returncode == 0, groups.stderr
    assert group in groups.stdout.split()

    offsets = aigc(infra, "kafka", "groups", "--describe", "--group", group)
    assert offsets.returncode == 0, offsets.stderr
    rows = [line.split() for line in offsets.stdout.splitlines() if topic in line]
    assert sorted((r[2], r[3]) for r in rows) == [("0", "1"), ("1", "0")], offsets.stdout


def test_a_tool_error_is_the_tools_exit_status(infra: Settings) -> None:
    missing = aigc(infra, "kafka", "topics", "--describe", "--topic", f"{unique('nope')}.missing")
    assert missing.returncode != 0
    assert "does not exist" in missing.stdout + missing.stderr
