"""The local services: Apache Kafka (KRaft), Apache Cassandra and S3Proxy as JVM command lines, and
Prometheus (infra/prometheus_server.py).

Each `Service` knows its folder under the run directory, the config files it writes there, the java
command that runs it from the jars Maven put in ``infra/lib/<name>/``, and how to tell it is ready for
clients (not merely started). Every JVM carries ``-Daigc.run=<run dir>`` so the launcher can prove a
process is one it started before it signals it (`Service.owns`). Everything binds to 127.0.0.1.
"""

from __future__ import annotations

import base64
import socket
import urllib.error
import urllib.request
import uuid
from abc import ABC, abstractmethod
from pathlib import Path

from typing_extensions import override

from plumbing.settings import BROKER_PORT_STEP, Settings

LOOPBACK = "127.0.0.1"

# Flags from Cassandra 5.0's conf/jvm17-server.options and jvm-server.options (INFRA.md section 2.2).
# fmt: off
_CASSANDRA_JAVA17 = [
    "--add-exports", "java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports", "java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED",
    "--add-exports", "java.management/com.sun.jmx.remote.security=ALL-UNNAMED",
    "--add-exports", "java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports", "java.rmi/sun.rmi.server=ALL-UNNAMED",
    "--add-exports", "java.sql/java.sql=ALL-UNNAMED",
    "--add-exports", "java.base/java.lang.ref=ALL-UNNAMED",
    "--add-exports", "jdk.unsupported/sun.misc=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang.module=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.loader=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.reflect=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.math=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.module=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.util.jar=ALL-UNNAMED",
    "--add-opens", "jdk.management/com.sun.management.internal=ALL-UNNAMED",
    "--add-opens", "java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens", "java.base/java.io=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang=ALL-UNNAMED",
    "--add-opens", "java.base/java.util=ALL-UNNAMED",
    "--add-opens", "java.base/java.nio=ALL-UNNAMED",
    "--add-opens", "java.base/java.nio.charset=ALL-UNNAMED",
]
# fmt: on


# Appended to each node's server.properties in the 3-broker cluster. Topics that bootstrap did not create
# (faust's changelogs) get min.insync.replicas 2 and 3 replicas too; a killed broker is fenced, and its
# partitions led elsewhere, after 2 s without a heartbeat (one every 0.5 s) instead of 9 s (one every 2 s):
# every coordinator it held is unavailable until then, and a completion waits for two of them. When the
# killed node is the active controller, the others start an election after 1 s without hearing from it
# instead of 2 s (the new controller then gives the dead broker its 2 s before fencing it).
CLUSTER_PROPERTIES = """default.replication.factor=3
min.insync.replicas=2
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=2000
controller.quorum.fetch.timeout.ms=1000
controller.quorum.election.backoff.max.ms=500
"""


def new_cluster_id() -> str:
    """A random KRaft cluster id: Kafka's Uuid.toString (URL-safe base64, no padding), not starting with -."""
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
    return "A" + cluster_id[1:] if cluster_id.startswith("-") else cluster_id


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


class Service(ABC):
    """A local service run as a JVM (or a native program) from the run directory: its files, its command line,
    and how to tell it is ready.
    """

    name: str
    main_class: str

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run_dir = settings.infra.run_dir.resolve()
        self.dir = self.run_dir / self.name
        self.lib = settings.infra.lib_dir.resolve() / self.name

    @property
    def log_file(self) -> Path:
        """The service's own output (stdout and stderr of its process)."""
        return self.dir / "service.log"

    @property
    def pid_file(self) -> Path:
        """The file the launcher keeps the service's process id in."""
        return self.dir / "pid"

    @property
    @abstractmethod
    def ports(self) -> tuple[int, ...]:
        """Loopback ports the service listens on (the first is the client port)."""

    @abstractmethod
    def prepare(self) -> None:
        """Write config files and create folders; idempotent."""

    @abstractmethod
    def java_args(self) -> list[str]:
        """JVM options before the main class (heap, GC, system properties)."""

    def program_args(self) -> list[str]:
        """Arguments after the main class (none by default)."""
        return []

    def command(self) -> list[str]:
        """The full command line that starts the service: java, its options, the classpath and main class."""
        return [
            "java",
            f"-Daigc.service={self.name}",
            f"-Daigc.run={self.run_dir}",
            *self.java_args(),
            "-cp",
            f"{self.lib}/*",
            self.main_class,
            *self.program_args(),
        ]

    def owns(self, args: list[str]) -> bool:
        """True when a process with command line ``args`` is this run directory's instance of the service."""
        return f"-Daigc.run={self.run_dir}" in args and f"-Daigc.service={self.name}" in args

    @abstractmethod
    def ready(self) -> bool:
        """True when a client can use the service now."""

    def check_jars(self) -> None:
        """Raise FileNotFoundError, naming the fix, when Maven has not put the service's jars in place."""
        if not self.lib.is_dir() or not any(self.lib.glob("*.jar")):
            raise FileNotFoundError(
                f"no jars in {self.lib}: run `make setup` (mvn -f infra/maven/pom.xml package) first"
            )


class Kafka(Service):
    """Apache Kafka in KRaft mode: one node that is both broker and controller.

    With ``infra.brokers`` 1 it is the only node (service ``kafka``); with 3 it is node ``node_id`` of a
    cluster of three (service ``kafka-<node_id>``): every node is a voter of one static controller quorum
    (it survives the loss of one), all three are formatted with one cluster id, and internal topics are
    replicated 3 ways with min.insync.replicas 2. Node i listens on the i-th bootstrap server's port and
    on ``kafka_controller_port + (i - 1) * BROKER_PORT_STEP``.
    """

    main_class = "kafka.Kafka"

    def __init__(self, settings: Settings, node_id: int = 1) -> None:
        brokers = settings.infra.brokers
        if not 1 <= node_id <= brokers:
            raise ValueError(f"kafka node {node_id}: infra.brokers is {brokers}")
        self.node_id = node_id
        self.name = "kafka" if brokers == 1 else f"kafka-{node_id}"
        super().__init__(settings)
        self.lib = settings.infra.lib_dir.resolve() / "kafka"

    @property
    def cluster(self) -> list[Kafka]:
        """Every node of this node's cluster (itself alone with one broker)."""
        return [Kafka(self.settings, i) for i in range(1, self.settings.infra.brokers + 1)]

    @property
    @override
    def ports(self) -> tuple[int, ...]:
        if self.settings.infra.brokers == 1:
            return (self.settings.kafka_port, self.settings.infra.kafka_controller_port)
        clients = self.settings.kafka_ports
        if len(clients) != self.settings.infra.brokers:
            raise ValueError(
                f"kafka.bootstrap_servers lists {len(clients)} servers; the local cluster of "
                f"{self.settings.infra.brokers} brokers needs one per node (or one, which stands for all)"
            )
        step = (self.node_id - 1) * BROKER_PORT_STEP
        return (clients[self.node_id - 1], self.settings.infra.kafka_controller_port + step)

    @property
    def properties_file(self) -> Path:
        """The broker's ``server.properties``, written by `prepare`."""
        return self.dir / "server.properties"

    def server_properties(self) -> str:
        """The text of this node's ``server.properties`` (with `CLUSTER_PROPERTIES` in a cluster).

        The coordinators' state topics are compacted, but only in rolled segments: at the default 100 MiB
        one segment held every commit since the cluster began (4.4 MB, 34k records after a day of test
        runs), and a new coordinator replays all of it before answering (5.3 s after a broker kill).
        Kafka's own advice: "kept relatively small in order to facilitate faster log compaction and cache
        loads". Share-group state gets one partition like the others (default 50, each one more partition
        to move and load on a kill). Both apply to topics created anew only."""
        client, controller = self.ports
        voters = ",".join(f"{n.node_id}@{LOOPBACK}:{n.ports[1]}" for n in self.cluster)
        brokers = self.settings.infra.brokers
        internal_rf, internal_min_isr = (1, 1) if brokers == 1 else (3, 2)
        text = f"""# written by aigc infra; see INFRA.md section 2.1
process.roles=broker,controller
node.id={self.node_id}
controller.quorum.voters={voters}
listeners=PLAINTEXT://{LOOPBACK}:{client},CONTROLLER://{LOOPBACK}:{controller}
advertised.listeners=PLAINTEXT://{LOOPBACK}:{client}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs={self.dir / "data"}
auto.create.topics.enable=false
num.partitions=1
offsets.topic.replication.factor={internal_rf}
offsets.topic.num.partitions=1
transaction.state.log.replication.factor={internal_rf}
transaction.state.log.min.isr={internal_min_isr}
transaction.state.log.num.partitions=1
# small segments: compaction keeps these topics small, and a new coordinator loads them fast
offsets.topic.segment.bytes=1048576
transaction.state.log.segment.bytes=1048576
share.coordinator.state.topic.segment.bytes=1048576
share.coordinator.state.topic.num.partitions=1
share.coordinator.state.topic.replication.factor={internal_rf}
share.coordinator.state.topic.min.isr={internal_min_isr}
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
        if brokers > 1:
            text += CLUSTER_PROPERTIES
        return text

    @override
    def prepare(self) -> None:
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self.properties_file.write_text(self.server_properties(), encoding="utf-8")
        (self.dir / "log4j2.properties").write_text(
            """status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = OUT
logger.start.name = kafka.server.KafkaRaftServer
logger.start.level = INFO
""",
            encoding="utf-8",
        )

    def _log_opts(self) -> list[str]:
        return [
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.dir / 'logs'}",
        ]

    def needs_format(self) -> bool:
        """True until the storage folder has been formatted (KRaft needs it once, before the first start)."""
        return not (self.dir / "data" / "meta.properties").exists()

    def cluster_id(self) -> str:
        """The cluster id to format with: a fresh one for a single broker; for the 3-broker cluster one id
        shared by all nodes, kept in ``<run>/kafka-cluster-id`` (a node formatted later joins the same
        cluster)."""
        if self.settings.infra.brokers == 1:
            return new_cluster_id()
        path = self.run_dir / "kafka-cluster-id"
        if not path.exists():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(new_cluster_id() + "\n", encoding="utf-8")
        return path.read_text(encoding="utf-8").strip()

    def format_command(self) -> list[str]:
        """StorageTool format with the cluster id; --ignore-formatted makes it idempotent."""
        return [
            "java",
            "-Xmx256m",
            *self._log_opts(),
            "-cp",
            f"{self.lib}/*",
            "kafka.tools.StorageTool",
            "format",
            "-t",
            self.cluster_id(),
            "-c",
            str(self.properties_file),
            "--ignore-formatted",
        ]

    @override
    def java_args(self) -> list[str]:
        heap = self.settings.infra.kafka_heap_mb
        return [
            f"-Xms{min(256, heap)}m",
            f"-Xmx{heap}m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent",
            "-Djava.awt.headless=true",
            *self._log_opts(),
        ]

    @override
    def program_args(self) -> list[str]:
        return [str(self.properties_file)]

    @override
    def ready(self) -> bool:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": f"{LOOPBACK}:{self.ports[0]}", "log_level": 0})
        try:
            brokers = admin.list_topics(timeout=2).brokers
        except Exception:  # noqa: BLE001 - any failure while the broker starts means not ready yet
            return False
        # A cluster node is ready once the controller lists it as an unfenced broker.
        return len(brokers) >= 1 if self.settings.infra.brokers == 1 else self.node_id in brokers


class Cassandra(Service):
    """Apache Cassandra: one node, with its configuration written under the run directory."""

    name = "cassandra"
    main_class = "org.apache.cassandra.service.CassandraDaemon"

    @property
    @override
    def ports(self) -> tuple[int, ...]:
        return (self.settings.cassandra.port, self.settings.infra.cassandra_storage_port)

    @override
    def prepare(self) -> None:
        for sub in ("data", "logs", "tmp", "triggers"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        cql, storage = self.ports
        (self.dir / "cassandra.yaml").write_text(
            f"""# written by aigc infra; see INFRA.md section 2.2
cluster_name: aigc-local
num_tokens: 1
initial_token: 0
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "{LOOPBACK}:{storage}"
listen_address: {LOOPBACK}
rpc_address: {LOOPBACK}
storage_port: {storage}
native_transport_port: {cql}
commitlog_sync: periodic
commitlog_sync_period: 10000ms
commitlog_disk_access_mode: legacy
hinted_handoff_enabled: false
auto_snapshot: false
concurrent_reads: 8
concurrent_writes: 8
concurrent_counter_writes: 8
concurrent_compactors: 1
memtable_heap_space: 64MiB
file_cache_size: 32MiB
key_cache_size: 16MiB
storage_compatibility_mode: NONE
paxos_variant: v2
""",
            encoding="utf-8",
        )
        (self.dir / "logback.xml").write_text(
            """<configuration>
  <appender name="OUT" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%d %level [%thread] %logger{0} - %msg%n</pattern></encoder>
  </appender>
  <logger name="org.apache.cassandra.service.StartupChecks" level="ERROR"/>
  <root level="INFO"><appender-ref ref="OUT"/></root>
</configuration>
""",
            encoding="utf-8",
        )

    @override
    def java_args(self) -> list[str]:
        heap = self.settings.infra.cassandra_heap_mb
        jamm = sorted(self.lib.glob("jamm-*.jar"))
        if not jamm:
            raise FileNotFoundError(f"no jamm jar in {self.lib}")
        d = self.dir
        return [
            "-ea",
            "-da:net.openhft...",
            "-Xss256k",
            "-XX:+UseTLAB",
            "-XX:+ResizeTLAB",
            "-XX:+PerfDisableSharedMem",
            "-Djava.net.preferIPv4Stack=true",
            "-Dchronicle.analytics.disable=true",
            f"-Xms{heap}m",
            f"-Xmx{heap}m",
            "-XX:+UseG1GC",
            "-XX:+ParallelRefProcEnabled",
            "-XX:MaxTenuringThreshold=1",
            "-XX:G1RSetUpdatingPauseTimePercent=5",
            "-XX:MaxGCPauseMillis=300",
            "-XX:InitiatingHeapOccupancyPercent=70",
            "-XX:+CrashOnOutOfMemoryError",
            "-Djdk.attach.allowAttachSelf=true",
            *_CASSANDRA_JAVA17,
            "-Dio.netty.tryReflectionSetAccessible=true",
            "-Dio.netty.allocator.useCacheForAllThreads=true",
            "-Dio.netty.allocator.maxOrder=11",
            f"-javaagent:{jamm[0]}",
            f"-Dcassandra.config=file://{d / 'cassandra.yaml'}",
            f"-Dcassandra.storagedir={d / 'data'}",
            f"-Dcassandra.logdir={d / 'logs'}",
            f"-Dlogback.configurationFile={d / 'logback.xml'}",
            "-Dcassandra-foreground=yes",
            "-Dcassandra.skip_wait_for_gossip_to_settle=0",
            "-Dcassandra.unsafesystem=true",
            f"-Dcassandra.triggers_dir={d / 'triggers'}",
            f"-Djna.tmpdir={d / 'tmp'}",
            f"-Djava.io.tmpdir={d / 'tmp'}",
        ]

    @override
    def ready(self) -> bool:
        if not port_open(self.ports[0]):
            return False  # the CQL port opens only at the end of startup
        from plumbing.metadata import connect
        from plumbing.settings import CassandraSettings

        try:
            cluster, session = connect(
                CassandraSettings(hosts=(LOOPBACK,), port=self.ports[0]), connect_timeout_s=2
            )
        except Exception:  # noqa: BLE001 - NoHostAvailable and friends while starting
            return False
        try:
            return session.execute("SELECT release_version FROM system.local").one() is not None
        except Exception:  # noqa: BLE001 - a query failing while starting means not ready yet
            return False
        finally:
            cluster.shutdown()


class S3Proxy(Service):
    """S3Proxy: an S3 API over a local folder (the filesystem blob store)."""

    name = "s3proxy"
    main_class = "org.gaul.s3proxy.Main"

    @property
    @override
    def ports(self) -> tuple[int, ...]:
        return (self.settings.s3_port,)

    @override
    def prepare(self) -> None:
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        (self.dir / "s3proxy.properties").write_text(
            f"""# written by aigc infra; see INFRA.md section 2.3
s3proxy.endpoint=http://{LOOPBACK}:{self.ports[0]}
s3proxy.authorization=none
s3proxy.ignore-unknown-headers=true
s3proxy.jetty.max-threads=32
jclouds.provider=filesystem-nio2
jclouds.filesystem.basedir={self.dir / "data"}
""",
            encoding="utf-8",
        )
        (self.dir / "logback.xml").write_text(
            """<configuration>
  <appender name="OUT" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%d %level %logger{0} - %msg%n</pattern></encoder>
  </appender>
  <root level="WARN"><appender-ref ref="OUT"/></root>
</configuration>
""",
            encoding="utf-8",
        )

    @override
    def java_args(self) -> list[str]:
        return [
            "-Xms64m",
            f"-Xmx{self.settings.infra.s3_heap_mb}m",
            "-XX:+UseSerialGC",
            f"-Dlogback.configurationFile={self.dir / 'logback.xml'}",
        ]

    @override
    def program_args(self) -> list[str]:
        return ["--properties", str(self.dir / "s3proxy.properties")]

    @override
    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{self.ports[0]}/", timeout=2) as resp:
                return resp.status == 200
        except urllib.error.HTTPError as exc:
            return exc.code == 403  # up, with authentication on
        except OSError:
            return False


def all_services(settings: Settings) -> list[Service]:
    """Every local service, in the order they start: Kafka (each node of the cluster), Cassandra, S3Proxy,
    Prometheus."""
    from infra.prometheus_server import Prometheus

    brokers = [Kafka(settings, node_id) for node_id in range(1, settings.infra.brokers + 1)]
    return [*brokers, Cassandra(settings), S3Proxy(settings), Prometheus(settings)]
