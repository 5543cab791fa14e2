"""The 3-broker cluster as configuration: settings, server.properties of each node, topics, selection.

Nothing runs here; tests/integration/test_cluster.py starts the cluster and kills its brokers.
"""

from __future__ import annotations

import os
from pathlib import Path

import pydantic
import pytest

from infra.launcher import kill, selected
from infra.services import Kafka, all_services
from plumbing.settings import CLUSTER_KAFKA_HEAP_MB, ENV_PREFIX, KafkaSettings, Settings
from plumbing.topics import Topics

# The single broker's server.properties as the launcher writes it (the existing tests and data directories
# rely on it): any change to the one-broker path fails here, so it is made on purpose. The changes since the
# launcher's first release leave a data directory as it was: the share-group heartbeat (1 s), and the
# internal topics' segment size and share-state partition count, which apply only to topics created anew
# (the brokers take an existing internal topic's partition count from the topic, not from this file).
SINGLE_BROKER = """# written by aigc infra; see INFRA.md section 2.1
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:19093
listeners=PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093
advertised.listeners=PLAINTEXT://127.0.0.1:19092
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs={run}/kafka/data
auto.create.topics.enable=false
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
# small segments: compaction keeps these topics small, and a new coordinator loads them fast
offsets.topic.segment.bytes=1048576
transaction.state.log.segment.bytes=1048576
share.coordinator.state.topic.segment.bytes=1048576
share.coordinator.state.topic.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# a renderer joining its share group gets its partitions at its first heartbeat: after 1 s, not 5 s
group.share.heartbeat.interval.ms=1000
group.share.min.heartbeat.interval.ms=1000
num.network.threads=2
num.io.threads=4
background.threads=2
num.recovery.threads.per.data.dir=1
log.cleaner.dedupe.buffer.size=16777216
log.cleaner.backoff.ms=5000
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def props(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return dict(pairs)


def cluster(tmp_path: Path, **kafka: object) -> Settings:
    return Settings.load(infra={"brokers": 3, "run_dir": tmp_path / "run"}, kafka=kafka)


def test_the_single_broker_config_is_unchanged(tmp_path: Path):
    settings = Settings.load(infra={"run_dir": tmp_path / "run"})
    (kafka,) = [s for s in all_services(settings) if isinstance(s, Kafka)]
    assert kafka.name == "kafka" and kafka.ports == (19092, 19093)
    kafka.prepare()
    assert kafka.properties_file.read_text() == SINGLE_BROKER.format(run=settings.infra.run_dir.resolve())
    assert settings.kafka.bootstrap_servers == "127.0.0.1:19092"
    assert settings.kafka.replication_factor == 1 and settings.infra.kafka_heap_mb == 1024
    assert all("min.insync.replicas" not in spec.config for spec in Topics(settings).all())


def test_three_nodes_form_one_quorum_on_their_own_ports(tmp_path: Path):
    settings = cluster(tmp_path)
    nodes = [s for s in all_services(settings) if isinstance(s, Kafka)]
    assert [n.name for n in nodes] == ["kafka-1", "kafka-2", "kafka-3"]
    assert [n.node_id for n in nodes] == [1, 2, 3]
    assert [n.ports for n in nodes] == [(19092, 19093), (19102, 19103), (19112, 19113)]
    configs = [props(n.server_properties()) for n in nodes]
    voters = "1@127.0.0.1:19093,2@127.0.0.1:19103,3@127.0.0.1:19113"
    for node, config in zip(nodes, configs, strict=True):
        client, controller = node.ports
        assert config["node.id"] == str(node.node_id)
        assert config["process.roles"] == "broker,controller"
        assert config["controller.quorum.voters"] == voters
        assert config["listeners"] == f"PLAINTEXT://127.0.0.1:{client},CONTROLLER://127.0.0.1:{controller}"
        assert config["advertised.listeners"] == f"PLAINTEXT://127.0.0.1:{client}"
        assert config["log.dirs"] == str(node.dir / "data")
        for key in (
            "offsets.topic.replication.factor",
            "transaction.state.log.replication.factor",
            "share.coordinator.state.topic.replication.factor",
            "default.replication.factor",
        ):
            assert config[key] == "3", key
        for key in (
            "transaction.state.log.min.isr",
            "share.coordinator.state.topic.min.isr",
            "min.insync.replicas",
        ):
            assert config[key] == "2", key
    # Apart from identity and addresses, the nodes are configured alike.
    differ = {"node.id", "listeners", "advertised.listeners", "log.dirs"}
    assert len({tuple((k, v) for k, v in c.items() if k not in differ) for c in configs}) == 1
    assert len({n.dir for n in nodes}) == 3 and {n.lib for n in nodes} == {nodes[0].lib}
    assert nodes[0].lib.name == "kafka"


def test_the_nodes_are_formatted_with_one_cluster_id(tmp_path: Path):
    settings = cluster(tmp_path)
    ids = {Kafka(settings, i).format_command()[-4] for i in (1, 2, 3)}
    assert len(ids) == 1
    (cluster_id,) = ids
    assert len(cluster_id) == 22 and not cluster_id.startswith("-")
    assert Kafka(cluster(tmp_path), 2).cluster_id() == cluster_id  # kept in the run directory
    single = Settings.load(infra={"run_dir": tmp_path / "single"})
    assert Kafka(single).cluster_id() != Kafka(single).cluster_id()  # one broker: a fresh id, as before


def test_processes_are_told_apart_by_service_name(tmp_path: Path):
    nodes = [Kafka(cluster(tmp_path), i) for i in (1, 2, 3)]
    for node in nodes:
        command = node.command()
        assert [other.owns(command) for other in nodes] == [other is node for other in nodes]
        assert f"-Xmx{CLUSTER_KAFKA_HEAP_MB}m" in command


def test_the_setting_lists_every_broker_and_replicates_topics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("AIGC_INFRA__BROKERS", "3")
    monkeypatch.setenv("AIGC_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:39092")
    settings = Settings.load()
    assert settings.kafka.bootstrap_servers == "127.0.0.1:39092,127.0.0.1:39102,127.0.0.1:39112"
    assert settings.kafka_ports == (39092, 39102, 39112)
    assert settings.kafka.replication_factor == 3 and settings.kafka.topic_min_insync_replicas == 2
    assert settings.infra.kafka_heap_mb == CLUSTER_KAFKA_HEAP_MB
    specs = Topics(settings).all()
    assert specs and all(spec.config["min.insync.replicas"] == "2" for spec in specs)
    # A child process rebuilt from the environment sees the same cluster.
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    child = Settings.load()
    assert child.kafka.bootstrap_servers == settings.kafka.bootstrap_servers
    assert (child.infra.brokers, child.kafka.replication_factor) == (3, 3)


def test_a_brokers_flag_reads_the_settings_again_for_that_count(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("AIGC_INFRA__BROKERS", raising=False)
    monkeypatch.delenv("AIGC_KAFKA__BOOTSTRAP_SERVERS", raising=False)
    one = Settings.load()
    assert one.for_brokers(None) is one and one.for_brokers(1) is one
    three = one.for_brokers(3)
    assert three.infra.brokers == 3 and len(three.kafka.bootstrap_servers.split(",")) == 3
    assert three.kafka.replication_factor == 3


def test_explicit_settings_win(tmp_path: Path):
    settings = cluster(
        tmp_path, bootstrap_servers="127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", replication_factor=1
    )
    assert settings.kafka.bootstrap_servers == "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3"
    assert [Kafka(settings, i).ports[0] for i in (1, 2, 3)] == [1, 2, 3]
    assert settings.kafka.replication_factor == 1 and settings.kafka.topic_min_insync_replicas is None
    assert KafkaSettings(replication_factor=3, min_insync_replicas=3).topic_min_insync_replicas == 3
    heap = Settings.load(infra={"brokers": 3, "kafka_heap_mb": 512})
    assert heap.infra.kafka_heap_mb == 512
    two = Settings.load(infra={"brokers": 3}, kafka={"bootstrap_servers": "127.0.0.1:1,127.0.0.1:2"})
    with pytest.raises(ValueError, match="one per node"):
        _ = Kafka(two, 3).ports


def test_only_one_or_three_brokers():
    with pytest.raises(pydantic.ValidationError, match="1 or 3"):
        Settings.load(infra={"brokers": 2})
    with pytest.raises(ValueError, match="node 4"):
        Kafka(Settings.load(infra={"brokers": 3}), 4)


def test_kafka_selects_every_node_and_a_node_only_itself(tmp_path: Path):
    services = all_services(cluster(tmp_path))
    assert [s.name for s in services if selected(s, ["kafka"])] == ["kafka-1", "kafka-2", "kafka-3"]
    assert [s.name for s in services if selected(s, ["kafka-2"])] == ["kafka-2"]
    assert [s.name for s in services if selected(s, None)] == [s.name for s in services]


def test_kill_names_a_service_of_the_layout(tmp_path: Path):
    settings = cluster(tmp_path)
    assert kill(settings, "kafka-3") is None  # nothing runs in a fresh run directory
    with pytest.raises(ValueError, match="kafka-1, kafka-2, kafka-3"):
        kill(settings, "kafka")
