"""The 3-broker cluster keeps every acknowledged record through the SIGKILL of a partition's leader.

Kafka's own system tests (ReplicationTest with ProduceConsumeValidateTest) in small: a producer with
acks=all and idempotence writes numbered records to a topic created by bootstrap from the registry
(replication factor 3, min.insync.replicas 2) while the leader of one of its partitions, the consumer
groups' coordinator where it leads one, is killed with SIGKILL; a static group member polling and
committing meanwhile must keep its partitions (its session outlasts the coordinator's failover).
Afterwards every record the producer saw acknowledged is read back exactly once, at the offset the
acknowledgement named, and the partition whose leader died goes on accepting acks=all writes on the
two brokers left. The killed broker then restarts from its data (``up(only=["kafka-<id>"])``, as the
chaos tool does) and rejoins the in-sync replicas. Meanwhile a process reads six groups' committed offsets
in a loop, as the gatekeeper's backlog monitor and the lag exporter do: it must live through the kill
(librdkafka's admin ListConsumerGroupOffsets aborted such processes, see `OffsetReader`), without spinning
on reconnects to the dead broker (its librdkafka threads took 1.8 s of CPU in the 5.6 s after the kill
with sparse connections, 0.00 s without; see `plumbing.kafka_clients.DENSE`). And a sink whose producer
blocks in send_offsets_to_transaction while the group's coordinator is stopped replaces the producer and
commits its batch once.

The cluster is the ``kafka_cluster`` fixture (tests/conftest.py): the session's Kafka when the suite
runs on 3 brokers (``--brokers 3``), otherwise three nodes of its own beside the session's Cassandra and
S3 server (ready in 8 s on the quiet 2-core machine, 23 to 56 s while other test runs shared it).
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import ConfigResource

from infra import launcher
from infra.bootstrap import ensure_topics
from infra.launcher import kill, owned_pid, up
from infra.services import Kafka
from plumbing.kafka_clients import make_admin, make_consumer, make_producer
from plumbing.settings import Settings
from plumbing.topics import Topics
from plumbing.watchdog import Watchdog
from stream_processors.assembler.metrics import SinkMetrics
from stream_processors.assembler.sink import TXN_CALL_S, Sink
from tests.conftest import unique

PARTITIONS = 3
WARMUP_ACKS = 300  # records acknowledged before the kill
AFTER_FAILOVER_S = 2.0  # producing on two brokers
FAILOVER_TIMEOUT_S = 30.0
REJOIN_TIMEOUT_S = 60.0
STOPPED_S = 12.0  # brokers SIGSTOPped under the sink: past OFFSETS_STUCK_S (8 s)


@pytest.fixture
def cluster(kafka_cluster: Settings) -> Settings:
    """The 3-broker cluster with a topic prefix of this test's own and 3 partitions per topic."""
    kafka = kafka_cluster.kafka.model_copy(update={"topic_prefix": unique("cl"), "partitions": PARTITIONS})
    return kafka_cluster.model_copy(update={"kafka": kafka})


@dataclass
class Acks:
    """What the producer heard back: (value, partition, offset, monotonic time) per acknowledged record."""

    acked: list[tuple[int, int, int, float]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    unflushed: int = -1  # records still unacknowledged when the producer gave up waiting (-1: not yet)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        """Producer callback: record the acknowledgement (or the error) of one record."""
        with self.lock:
            if err is None:
                value = msg.value()
                assert value is not None
                self.acked.append((int(value), msg.partition(), msg.offset(), time.monotonic()))  # type: ignore[arg-type]
            else:
                self.failed.append(str(err))

    def count(self) -> int:
        """Records acknowledged so far."""
        with self.lock:
            return len(self.acked)

    def since(self, moment: float, partition: int) -> int:
        """Records of ``partition`` acknowledged after ``moment``."""
        with self.lock:
            return sum(1 for _, p, _, t in self.acked if p == partition and t > moment)


def produce(settings: Settings, topic: str, acks: Acks, stop: threading.Event) -> None:
    """Numbered records, keyed to every partition in turn, about 500 a second, until ``stop``."""
    producer = make_producer(settings, "cluster-test", **{"message.timeout.ms": 60_000})
    n = 0
    while not stop.is_set():
        producer.produce(
            topic, key=str(n), value=str(n), partition=n % PARTITIONS, on_delivery=acks.on_delivery
        )
        producer.poll(0)
        n += 1
        time.sleep(0.002)
    acks.unflushed = producer.flush(90)


class GroupMember:
    """A static member of a consumer group, as a sink is (`make_consumer`): subscribed to ``topic``, polling
    and committing its position asynchronously every half second in a thread of its own. It records when
    its commits succeeded and whether it ever lost its partitions (a rebalance)."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.commits: list[float] = []
        self.revoked: list[list[int]] = []
        self.assigned = threading.Event()
        self.stop = threading.Event()
        self.consumer = make_consumer(
            settings,
            unique("member"),
            "cluster-member",
            **{"group.instance.id": "member-1", "on_commit": self._on_commit},
        )
        self.consumer.subscribe(
            [topic],
            on_assign=lambda _c, parts: self.assigned.set() if parts else None,
            on_revoke=lambda _c, parts: self.revoked.append([p.partition for p in parts]) if parts else None,
        )
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _on_commit(self, err: KafkaError | None, _parts: list[TopicPartition]) -> None:
        if err is None:
            self.commits.append(time.monotonic())

    def _run(self) -> None:
        last = 0.0
        while not self.stop.is_set():
            self.consumer.poll(0.2)
            if self.assigned.is_set() and time.monotonic() - last > 0.5:
                last = time.monotonic()
                positions = [p for p in self.consumer.position(self.consumer.assignment()) if p.offset >= 0]
                if positions:
                    self.consumer.commit(offsets=positions, asynchronous=True)

    def close(self) -> list[list[int]]:
        """Leave the group; the revocations seen until then (leaving revokes the partitions once more)."""
        self.stop.set()
        self.thread.join(30)
        revoked = list(self.revoked)
        self.consumer.close()
        return revoked


def partition_state(settings: Settings, topic: str, partition: int) -> tuple[int, list[int]]:
    """The leader and in-sync replicas of ``topic``'s ``partition`` as the cluster's metadata has them."""
    meta = make_admin(settings).list_topics(topic, timeout=10).topics[topic].partitions[partition]
    return meta.leader, sorted(meta.isrs)


def wait_for(what: str, timeout_s: float, check: Callable[[], bool]) -> float:
    """Seconds until ``check()`` is true; fails the test after ``timeout_s``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if check():
            return time.monotonic() - started
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {timeout_s:.0f} s")


def read_all(settings: Settings, topic: str) -> dict[tuple[int, int], int]:
    """Every record of ``topic`` from the start to the end: (partition, offset) -> value."""
    consumer = Consumer(
        {**settings.kafka.client_config(), "group.id": unique("verify"), "enable.auto.commit": False}
    )
    try:
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(PARTITIONS)
        }
        consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
        records: dict[tuple[int, int], int] = {}
        deadline = time.monotonic() + 60
        while any(records.get((p, end - 1)) is None for p, end in ends.items() if end > 0):
            assert time.monotonic() < deadline, f"read {len(records)} records, ends {ends}"
            for msg in consumer.consume(1000, 1.0):
                if msg.error() is None:
                    records[(msg.partition(), msg.offset())] = int(msg.value())  # type: ignore[arg-type]
        return records
    finally:
        consumer.close()


def test_the_nodes_form_one_cluster(cluster: Settings):
    """Every node lists all three brokers and one cluster id (formatted with the shared id)."""
    ids = set()
    for node_id in (1, 2, 3):
        node = Kafka(cluster, node_id)
        meta = (node.dir / "data" / "meta.properties").read_text(encoding="utf-8")
        ids |= {line.split("=", 1)[1] for line in meta.splitlines() if line.startswith("cluster.id=")}
        alone = cluster.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{node.ports[0]}"})
        brokers = make_admin(cluster.model_copy(update={"kafka": alone})).list_topics(timeout=10).brokers
        assert sorted(brokers) == [1, 2, 3], node.name
    assert len(ids) == 1


READER = """
import pathlib, sys, time
from confluent_kafka import KafkaException
from plumbing.kafka_clients import OffsetReader
from plumbing.settings import Settings
reader, done, calls, errors = OffsetReader(Settings.load()), pathlib.Path(sys.argv[2]), 0, 0
while not done.exists():
    for group in (f"{sys.argv[1]}.g{i}" for i in range(6)):  # six coordinators' worth of groups
        try:
            reader.group_offsets(group, [sys.argv[1]], timeout_s=5.0)
            calls += 1
        except KafkaException:
            errors += 1
    time.sleep(0.05)
print(f"{calls} group offset reads, {errors} failed, alive")
"""


def offset_reader(settings: Settings, topic: str, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """A process reading six groups' offsets of ``topic`` in a loop (`OffsetReader`, as the gatekeeper
    and the lag exporter do) until the returned file exists: a broker kill must not crash it."""
    done = tmp_path / "done"
    env = {**os.environ, **settings.to_env()}
    proc = subprocess.Popen(
        [sys.executable, "-c", READER, topic, str(done)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    return proc, done


def thread_cpu_s(pid: int, prefix: str) -> float:
    """CPU seconds (user and system) used so far by the live threads of process ``pid`` whose names start
    with ``prefix``."""
    ticks = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if not (task / "comm").read_text(encoding="utf-8").startswith(prefix):
                continue
            fields = (task / "stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def test_every_acknowledged_record_survives_the_leader_kill(cluster: Settings, tmp_path: Path):
    topics = Topics(cluster)
    (spec,) = [s for s in topics.all() if s.name == topics.completions]
    ensure_topics(cluster, [spec])  # bootstrap's own path: replication factor and config from the registry
    topic = spec.name
    admin = make_admin(cluster)
    described = admin.list_topics(topic, timeout=10).topics[topic].partitions
    assert len(described) == PARTITIONS
    assert all(sorted(p.replicas) == [1, 2, 3] for p in described.values())
    config = next(iter(admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, topic)]).values()))
    assert config.result()["min.insync.replicas"].value == "2"

    acks, stop = Acks(), threading.Event()
    producer = threading.Thread(target=produce, args=(cluster, topic, acks, stop), daemon=True)
    producer.start()
    reader, done = offset_reader(cluster, topic, tmp_path)
    member = GroupMember(cluster, topic)
    try:
        wait_for("warm-up acknowledgements", 60, lambda: acks.count() >= WARMUP_ACKS)
        wait_for("the group member's first commit", 60, lambda: bool(member.commits))
        # The victim leads a partition of the topic and, where it can be had, coordinates every group
        # (leads __consumer_offsets' one partition); in a topic bootstrap just made each node leads one.
        coordinator, _ = partition_state(cluster, "__consumer_offsets", 0)
        leaders = [partition_state(cluster, topic, p)[0] for p in range(PARTITIONS)]
        part = leaders.index(coordinator) if coordinator in leaders else 0
        leader, isr = partition_state(cluster, topic, part)
        assert isr == [1, 2, 3]
        victim = Kafka(cluster, leader)
        acked_before = acks.count()
        reader_cpu_before = thread_cpu_s(reader.pid, "rdk:")  # librdkafka's threads
        killed = time.monotonic()
        assert kill(cluster, victim.name) is not None  # SIGKILL, as a crash
        failover = wait_for(
            f"partition {part} led by a live broker after {victim.name} died",
            FAILOVER_TIMEOUT_S,
            lambda: (
                (state := partition_state(cluster, topic, part))[0] not in (leader, -1)
                and leader not in state[1]
            ),
        )
        new_leader, isr_after = partition_state(cluster, topic, part)
        moved = time.monotonic()
        time.sleep(AFTER_FAILOVER_S)  # writing on two brokers: ISR 2 = min.insync.replicas
        written_after = acks.since(moved, part)
        wait_for(
            "the group member's first commit after the kill",
            FAILOVER_TIMEOUT_S,
            lambda: any(t > killed for t in member.commits),
        )
        recommitted_s = min(t for t in member.commits if t > killed) - killed
        reader_cpu = thread_cpu_s(reader.pid, "rdk:") - reader_cpu_before
        outage_s = time.monotonic() - killed
    finally:
        stop.set()
        done.touch()
        producer.join(120)
        revoked = member.close()
    assert not producer.is_alive()
    out, _ = reader.communicate(timeout=60)
    # librdkafka's admin ListConsumerGroupOffsets aborted the process here (#4605); OffsetReader must not
    assert reader.returncode == 0, f"the offset reader died ({reader.returncode}): {out.decode()[-2000:]}"
    print(f"[cluster] offset reader through the kill: {out.decode().strip().splitlines()[-1]}")
    assert acks.unflushed == 0, f"{acks.unflushed} records unacknowledged 90 s after producing stopped"
    with acks.lock:
        acked = list(acks.acked)
    times = sorted(t for _, p, _, t in acked if p == part)
    gap = max((b - a for a, b in itertools.pairwise(times) if b > killed), default=0.0)
    print(
        f"[cluster] killed {victim.name} (leader of partition {part}"
        f"{', group coordinator' if leader == coordinator else ''}) after {acked_before} acks; partition "
        f"{part} led by node {new_leader} (ISR {isr_after}) {failover:.1f} s later; it acknowledged nothing "
        f"for {gap:.1f} s; {written_after} acks on it in {AFTER_FAILOVER_S:.0f} s on two brokers; "
        f"{len(acked)} acked, {len(acks.failed)} failed; the group member committed again "
        f"{recommitted_s:.1f} s after the kill"
    )
    print(
        f"[cluster] the offset reader's librdkafka threads used {reader_cpu:.2f} s of CPU in the "
        f"{outage_s:.1f} s after the kill"
    )
    assert reader_cpu < 0.05 * outage_s, "the offset reader spins reconnecting to the killed broker"
    assert len(isr_after) == 2
    assert written_after > 0, "no acks=all write accepted with one broker down"

    try:
        # The member's session (CONSUMER_SESSION_MS) outlasts the coordinator's failover: no rebalance.
        assert revoked == [], f"the group member lost its partitions: {revoked}"
        records = read_all(cluster, topic)
        counts = Counter(records.values())
        duplicates = sorted(v for v, n in counts.items() if n > 1)
        assert not duplicates, f"records written twice: {duplicates[:20]}"
        lost = [(v, p, o) for v, p, o, _ in acked if records.get((p, o)) != v]
        assert not lost, f"{len(lost)} acknowledged records missing or moved, e.g. {lost[:10]}"
        assert {v for v, *_ in acked} <= set(counts)
    finally:
        # The killed broker restarts from its data and catches up into the in-sync replicas (also when an
        # assertion above failed: the next test needs all three).
        up(cluster, attached=True, only=[victim.name], echo=lambda line: print(f"[cluster] {line}"))
        rejoined = wait_for(
            f"{victim.name} back in the ISR",
            REJOIN_TIMEOUT_S,
            lambda: partition_state(cluster, topic, part)[1] == [1, 2, 3],
        )
    print(
        f"[cluster] {victim.name} restarted and back in partition {part}'s ISR {rejoined:.1f} s after ready"
    )


def test_the_sink_replaces_a_producer_stuck_in_send_offsets(cluster: Settings):
    """The group's coordinator and one more broker stop answering (SIGSTOP, for STOPPED_S) while a sink
    adds its offsets to a transaction. With two of three nodes stopped nothing can move the coordinator,
    so librdkafka blocks in send_offsets_to_transaction (16 s, then an error, when tried by hand) as in
    #5511 (with the coordinator alone stopped it moved after the fencing, 4 s then, and the call returned
    in 5 to 8 s or not, by chance). After OFFSETS_STUCK_S the sink starts a new producer with its
    transactional.id, which fences the old one and aborts its transaction; the batch done again with the
    new producer commits, once."""
    topics = Topics(cluster)
    (spec,) = [s for s in topics.all() if s.name == topics.completions]
    ensure_topics(cluster, [spec])
    topic, group = spec.name, unique("sink-group")
    settings = cluster.model_copy(
        update={"assembler": cluster.assembler.model_copy(update={"instance": "t"})}
    )
    watchdog = Watchdog(600)
    sink = SimpleNamespace(
        settings=settings,
        topics=topics,
        watchdog=watchdog,
        consumer=make_consumer(settings, group, "sink-test"),
        metrics=SinkMetrics(),
        _stuck=[],
        _brokers=set(),
    )
    sink._transactional_producer = partial(Sink._transactional_producer, sink)
    sink._call = partial(Sink._call, sink)
    sink._broker_left = partial(Sink._broker_left, sink)
    sink.producer = sink._transactional_producer()
    stop = threading.Event()
    sink._call(partial(sink.producer.init_transactions, TXN_CALL_S), stop)
    sink.consumer.committed([TopicPartition(topic, 0)], timeout=30)  # the group has a coordinator now
    assert not sink._broker_left()  # the brokers seen: none leaves while stopped (no quorum to fence them)
    # every group's coordinator: the leader of the one partition of __consumer_offsets
    coordinator, _ = partition_state(settings, "__consumer_offsets", 0)
    other = next(node for node in (1, 2, 3) if node != coordinator)
    stopped = [owned_pid(Kafka(settings, node)) for node in (coordinator, other)]
    assert None not in stopped

    def resume() -> None:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)  # type: ignore[arg-type]

    first = sink.producer
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)  # type: ignore[arg-type]
    resuming = threading.Timer(STOPPED_S, resume)
    resuming.start()
    try:
        first.begin_transaction()
        first.produce(topic, b"stuck", partition=0)
        started = time.monotonic()
        with pytest.raises(KafkaException) as raised:
            Sink._send_offsets(sink, [TopicPartition(topic, 0, 1)], stop)
        replaced_after = time.monotonic() - started
        assert raised.value.args[0].retriable()
        assert sink.producer is not first and sink._stuck == [first]
        # the batch again, as the sink does after a retriable failure (abort, if the producer is the same)
        deadline = time.monotonic() + 90
        while True:
            producer = sink.producer
            producer.begin_transaction()
            producer.produce(topic, b"again", partition=0)
            try:
                Sink._send_offsets(sink, [TopicPartition(topic, 0, 1)], stop)
                sink._call(partial(producer.commit_transaction, TXN_CALL_S), stop)
                break
            except KafkaException:
                assert time.monotonic() < deadline, "the batch did not commit with a new producer"
                if sink.producer is producer:
                    sink._call(partial(producer.abort_transaction, TXN_CALL_S), stop)
        committed_after = time.monotonic() - started
    finally:
        resuming.cancel()
        resume()
        watchdog.stop()
    # the resumed brokers (fenced meanwhile) are back in the ISR before the next test
    wait_for(
        f"kafka-{coordinator} and kafka-{other} back in the ISR",
        REJOIN_TIMEOUT_S,
        lambda: partition_state(settings, "__consumer_offsets", 0)[1] == [1, 2, 3],
    )
    print(
        f"[cluster] coordinator kafka-{coordinator} and kafka-{other} stopped: producer replaced after "
        f"{replaced_after:.1f} s, the batch committed {committed_after:.1f} s after the first try "
        f"({len(sink._stuck)} replaced)"
    )
    values = _committed_values(settings, topic, 0)
    assert values.count(b"again") == 1 and b"stuck" not in values, values


def _committed_values(settings: Settings, topic: str, partition: int) -> list[bytes]:
    """The values of ``topic``'s ``partition`` that a read_committed consumer sees, start to end."""
    consumer = Consumer(
        {
            **settings.kafka.client_config(),
            "group.id": unique("verify"),
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        consumer.assign([TopicPartition(topic, partition, 0)])
        values: list[bytes] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and b"again" not in values:
            for msg in consumer.consume(100, 1.0):
                if msg.error() is None and msg.value() is not None:
                    values.append(msg.value())  # type: ignore[arg-type]
        return values
    finally:
        consumer.close()


def _fake_node(settings: Settings, node_id: int, ignore_term: bool) -> subprocess.Popen[bytes]:
    """A process the launcher takes for the cluster's node ``node_id`` (its markers on the command line);
    one that ignores SIGTERM stands for a node whose controlled shutdown waits for a quorum."""
    node = Kafka(settings, node_id)
    node.dir.mkdir(parents=True, exist_ok=True)
    handler = "signal.SIG_IGN" if ignore_term else "signal.SIG_DFL"
    code = (
        f"import signal, time; signal.signal(signal.SIGTERM, {handler}); print(flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, f"-Daigc.service={node.name}", f"-Daigc.run={node.run_dir}"],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # its SIGTERM handler is in place
    node.pid_file.write_text(f"{proc.pid}\n")
    return proc


def test_down_ends_the_nodes_left_without_a_quorum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Stopping the whole cluster, the last node cannot finish its controlled shutdown (no quorum to
    approve it): `down` kills it after QUORUM_GRACE_S instead of waiting STOP_TIMEOUT_S. A node stopped
    while the others run keeps the full grace period."""
    settings = Settings.load(infra={"brokers": 3, "run_dir": tmp_path / "run"})
    monkeypatch.setattr(launcher, "QUORUM_GRACE_S", 1.0)
    monkeypatch.setattr(launcher, "STOP_TIMEOUT_S", 8.0)
    procs = [_fake_node(settings, 1, ignore_term=True)] + [_fake_node(settings, i, False) for i in (2, 3)]
    lines: list[str] = []
    try:
        started = time.monotonic()
        assert launcher.down(settings, only=["kafka"], echo=lines.append) == []
        took = time.monotonic() - started
        assert launcher.QUORUM_GRACE_S <= took < launcher.STOP_TIMEOUT_S - 2, took
        assert any(line.startswith("kafka-1: the controller quorum is gone") for line in lines), lines
        assert all(p.wait(5) is not None for p in procs)

        lines.clear()
        procs = [_fake_node(settings, 1, ignore_term=True)] + [_fake_node(settings, i, False) for i in (2, 3)]
        assert all(owned_pid(Kafka(settings, i)) == p.pid for i, p in zip((1, 2, 3), procs, strict=True))
        monkeypatch.setattr(launcher, "STOP_TIMEOUT_S", 3.0)
        assert launcher.down(settings, only=["kafka-1"], echo=lines.append) == ["kafka-1"]  # quorum intact
        assert not any("quorum" in line for line in lines), lines
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
