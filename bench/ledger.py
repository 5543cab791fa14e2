"""The cost ledger: what one completed request or video frame costs every part of the machine.

A `Probe` reads, at one moment, every counter the ledger keeps: per topic of the run, the broker's end
offsets (records; transaction markers are records too) and the bytes of its partition logs on disk; the
Kafka requests, CQL statements and S3 calls the stage processes counted themselves
(`plumbing.call_counts`, on through ``Settings.call_counts_dir``); Cassandra's own per-table read and
write counts for the run's keyspace (``system_views``) and its Paxos state table's; and the CPU time
of every stage process and of each JVM (``/proc/<pid>/stat``). `difference` of two reads, divided by
the requests or frames completed between them (`per_unit`), is the ledger.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.profile import descendants, services
from plumbing.kafka_clients import make_admin
from plumbing.settings import Settings

HZ = os.sysconf("SC_CLK_TCK")
_PARTITION_DIR = re.compile(r"^(.+)-(\d+)$")
CASSANDRA_VIEWS = (
    "coordinator_read_latency",
    "coordinator_write_latency",
    "local_read_latency",
    "local_write_latency",
)
# A Paxos round of an LWT reads and writes system.paxos on every replica; the table is node-wide, so
# its counts include every other client's LWTs in the window.
PAXOS_TABLE = ("system", "paxos")


def cpu_ms(stat: str) -> float:
    """CPU milliseconds of a process from its ``/proc/<pid>/stat`` line: user + system time, its own and
    that of its children it waited for (the sink's ffmpeg encodes)."""
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) * 1000 / HZ


def process_cpu_ms(pid: int) -> float | None:
    """`cpu_ms` of a running process; None once it has gone."""
    try:
        return cpu_ms(Path(f"/proc/{pid}/stat").read_text())
    except OSError:
        return None


def kafka_log_dir(pid: int) -> Path | None:
    """The broker's log directory, from the server.properties its command line names."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return None
    for arg in args:
        if arg.endswith("server.properties") and Path(arg).exists():
            for line in Path(arg).read_text().splitlines():
                if line.startswith("log.dirs="):
                    return Path(line.split("=", 1)[1].split(",")[0])
    return None


def partition_dirs(log_dir: Path) -> dict[str, list[Path]]:
    """Topic -> its partition directories in the broker's log directory (deleted ones left out)."""
    out: dict[str, list[Path]] = {}
    with os.scandir(log_dir) as entries:
        for entry in entries:
            match = _PARTITION_DIR.match(entry.name)
            if match and entry.is_dir():
                out.setdefault(match.group(1), []).append(Path(entry.path))
    return out


def log_bytes(partitions: list[Path]) -> int:
    """Bytes in the partitions' log segments (record batches as stored: compressed, with headers)."""
    total = 0
    for directory in partitions:
        for segment in directory.glob("*.log"):
            try:
                total += segment.stat().st_size
            except OSError:
                continue  # a segment deleted between listing and stat
    return total


def call_totals(documents: list[dict[str, Any]]) -> dict[str, Counter[str]]:
    """The `plumbing.call_counts` files of every process added up: family -> kind -> count."""
    totals: dict[str, Counter[str]] = {}
    for doc in documents:
        for family, kinds in doc.get("counts", {}).items():
            totals.setdefault(family, Counter()).update(kinds)
        for client in doc.get("kafka", {}).values():
            totals.setdefault("kafka requests (librdkafka)", Counter()).update(client["requests"])
            # data records only (no transaction markers), and only librdkafka's clients (not faust's)
            totals.setdefault("kafka messages (librdkafka clients)", Counter()).update(
                produced=client.get("messages_produced", 0), consumed=client.get("messages_consumed", 0)
            )
    return totals


def difference(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """``after - before``, key by key, through nested dicts (a key missing before counts from 0)."""
    out: dict[str, Any] = {}
    for key, value in after.items():
        prior = before.get(key)
        if isinstance(value, dict):
            out[key] = difference(prior if isinstance(prior, dict) else {}, value)
        elif isinstance(value, int | float):
            out[key] = value - (prior if isinstance(prior, int | float) else 0)
    return out


def scale(delta: dict[str, Any], factor: float) -> dict[str, Any]:
    """Every figure of ``delta`` times ``factor``, nested; zeros and emptied dicts left out."""
    out: dict[str, Any] = {}
    for key, value in delta.items():
        if isinstance(value, dict):
            inner = scale(value, factor)
            if inner:
                out[key] = inner
        elif value:
            out[key] = value * factor
    return out


def per_unit(delta: dict[str, Any], units: int) -> dict[str, Any]:
    """Every figure of ``delta`` divided by ``units`` (completed requests or frames); zeros left out."""
    return scale(delta, 1 / units) if units > 0 else {}


@dataclass
class Probe:
    """Reads the ledger's counters for one run (its topics and keyspace) and the machine's processes."""

    settings: Settings
    stages: dict[str, int]  # stage name -> pid
    jvms: dict[str, int] = field(default_factory=dict)  # service -> pid
    log_dir: Path | None = None

    def __post_init__(self) -> None:
        self.admin = make_admin(self.settings)
        self.jvms = {name: pid for pid, name in services(self.settings).items()}
        self.log_dir = kafka_log_dir(self.jvms["kafka"]) if "kafka" in self.jvms else None
        from plumbing.metadata import connect

        self.cluster, self.session = connect(self.settings.cassandra)
        self.topics = self._run_topics()

    def close(self) -> None:
        """Close the Cassandra session."""
        self.cluster.shutdown()

    def _run_topics(self) -> dict[str, list[int]]:
        prefix = self.settings.kafka.topic_prefix + "."
        app = self.settings.gatekeeper.app_id + "-"  # faust's own topics (changelogs, repartitions)
        metadata = self.admin.list_topics(timeout=30).topics
        return {
            name: list(t.partitions)
            for name, t in metadata.items()
            if name.startswith((prefix, app)) or name.startswith("__")
        }

    def short(self, topic: str) -> str:
        """A topic's name without the run's prefix (broker-wide topics say so)."""
        for prefix in (self.settings.kafka.topic_prefix + ".", self.settings.gatekeeper.app_id + "-"):
            if topic.startswith(prefix):
                return topic[len(prefix) :]
        return f"{topic} (broker-wide)"

    def records(self) -> dict[str, int]:
        """Records written so far per topic: the sum of its partitions' end offsets."""
        from confluent_kafka import TopicPartition
        from confluent_kafka.admin import OffsetSpec

        request = {TopicPartition(t, p): OffsetSpec.latest() for t, ps in self.topics.items() for p in ps}
        totals: Counter[str] = Counter()
        for tp, future in self.admin.list_offsets(request, request_timeout=30).items():
            totals[self.short(tp.topic)] += future.result().offset
        return dict(totals)

    def bytes(self) -> dict[str, int]:
        """Bytes of each topic's partition logs on the broker's disk (empty without its log directory)."""
        if self.log_dir is None:
            return {}
        dirs = partition_dirs(self.log_dir)
        return {self.short(t): log_bytes(dirs.get(t, [])) for t in self.topics}

    def broker_partitions(self) -> int | None:
        """Partitions the broker holds, of every topic (None without its log directory)."""
        return None if self.log_dir is None else sum(len(d) for d in partition_dirs(self.log_dir).values())

    def cassandra(self) -> dict[str, int]:
        """Cassandra's own counts: reads and writes it coordinated and applied, per table of the run's
        keyspace, and its Paxos state table's (node-wide)."""
        out: dict[str, int] = {}
        keyspace = self.settings.cassandra.keyspace
        for view in CASSANDRA_VIEWS:
            for keyspace_name, table in ((keyspace, None), PAXOS_TABLE):
                query = f"SELECT table_name, count FROM system_views.{view} WHERE keyspace_name = %s"
                for row in self.session.execute(query, (keyspace_name,)):
                    if table is None or row.table_name == table:
                        label = row.table_name if table is None else f"{keyspace_name}.{table} (node-wide)"
                        out[f"{view.replace('_latency', 's')}: {label}"] = row.count
        return out

    def calls(self) -> dict[str, dict[str, int]]:
        """The stage processes' own call counts, added up: family -> kind -> count."""
        directory = self.settings.call_counts_dir
        documents = []
        for path in directory.glob("*.json") if directory else ():
            try:
                documents.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # replaced while read: the writer renames a whole file in place
        return {family: dict(kinds) for family, kinds in call_totals(documents).items()}

    def cpu(self) -> dict[str, float]:
        """CPU ms so far of each stage (its children included), each JVM and the bench driver."""
        out: dict[str, float] = {}
        for name, pid in {**self.stages, **self.jvms}.items():
            pids = descendants(pid) if name in self.stages else [pid]
            out[name] = sum(ms for p in pids if (ms := process_cpu_ms(p)) is not None)
        out["bench driver (load, collector, probe)"] = process_cpu_ms(os.getpid()) or 0.0
        return out

    def read(self) -> dict[str, Any]:
        """Every counter now, with a monotonic timestamp: what `difference` takes two of."""
        return {
            "seconds": time.monotonic(),
            "kafka records": self.records(),
            "kafka bytes on disk": self.bytes(),
            "calls": self.calls(),
            "cassandra (server)": self.cassandra(),
            "cpu ms": self.cpu(),
        }


def cpu_totals(cpu: dict[str, float], stages: list[str], jvms: list[str]) -> dict[str, float]:
    """CPU summed over the JVMs, over our stage processes, and over both (the bench driver apart)."""
    jvm = sum(cpu.get(name, 0.0) for name in jvms)
    ours = sum(cpu.get(name, 0.0) for name in stages)
    return {"JVMs": jvm, "our Python stages": ours, "all (JVMs + stages)": jvm + ours}


def ledger(before: dict[str, Any], after: dict[str, Any], units: int, probe: Probe) -> dict[str, Any]:
    """The window between two reads, per unit: every counter family, transactions and CPU totals."""
    delta = difference(before, after)
    calls = delta.pop("calls")
    delta.update(calls)
    requests = calls.get("kafka requests (librdkafka)", {})
    delta["kafka transactions (EndTxn requests)"] = requests.get("EndTxn", 0)
    delta["cpu ms totals"] = cpu_totals(delta["cpu ms"], list(probe.stages), list(probe.jvms))
    window_s = delta.pop("seconds")
    return {"window_s": window_s, "units": units, "per_unit": per_unit(delta, units), "totals": delta}


def idle_rates(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the pipeline costs with no load, per second: CPU ms per process and the requests each
    counter family counted (consumers polling, heartbeats, the gatekeeper's monitors)."""
    delta = difference(before, after)
    seconds = delta.pop("seconds")
    rates = {"cpu ms": delta["cpu ms"], **delta["calls"]}
    return {"window_s": seconds, "per_second": scale(rates, 1 / seconds)}


def above_idle(window: dict[str, Any], idle: dict[str, Any]) -> dict[str, float]:
    """CPU ms per unit once each process's idle rate over the window is taken off (what the work added)."""
    idle_cpu = idle["per_second"].get("cpu ms", {})
    return {
        name: (ms - idle_cpu.get(name, 0.0) * window["window_s"]) / window["units"]
        for name, ms in window["totals"]["cpu ms"].items()
    }
