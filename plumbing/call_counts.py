"""This process's calls to Kafka, Cassandra and S3, counted for the benchmark ledger (opt-in).

With ``Settings.call_counts_dir`` set (``AIGC_CALL_COUNTS_DIR``), the client factories hand their clients
to this process's `CallCounts`, which writes ``<dir>/<pid>.json`` at most every `FLUSH_S` (and at exit):

- ``kafka``: per librdkafka client, its latest statistics (``statistics.interval.ms``) reduced to the
  requests it sent per type, summed over its broker connections, and its bytes and messages;
- ``counts``: CQL statements by kind (a driver request-init listener), S3 operations by name (a botocore
  ``before-call`` hook; presigning, which sends nothing, separately), and in the faust gatekeeper the
  requests aiokafka sends per type (librdkafka statistics do not see faust's clients).

Every number is cumulative since the process started, so a reader takes differences between two reads.
Unset (the default), nothing is registered and nothing is counted.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

FLUSH_S = 0.5
STATS_INTERVAL_MS = 1000

# cassandra.ConsistencyLevel.SERIAL and LOCAL_SERIAL, spelled here so that importing this module (every
# stage does) does not import the Cassandra driver
SERIAL_LEVELS = (8, 9)
_LWT = re.compile(r"\bIF\s+(NOT\s+EXISTS|EXISTS|\w+\s*(=|!=|<|>|IN\b))", re.IGNORECASE)
_TABLE = re.compile(r"\b(?:INTO|FROM|UPDATE)\s+([\w.\"]+)", re.IGNORECASE)


def kafka_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """One librdkafka statistics document reduced to what the ledger adds up: requests sent by type over
    every broker connection (the bootstrap and coordinator connections included), bytes and messages."""
    requests: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for broker in stats.get("brokers", {}).values():
        requests.update({name: n for name, n in broker.get("req", {}).items() if n})
        totals.update({k: broker.get(k, 0) for k in ("tx", "txbytes", "rx", "rxbytes")})
    return {
        "type": stats.get("type"),
        "requests": dict(requests),
        "requests_sent": totals["tx"],
        "bytes_sent": totals["txbytes"],
        "responses": totals["rx"],
        "bytes_received": totals["rxbytes"],
        "messages_produced": stats.get("txmsgs", 0),
        "messages_consumed": stats.get("rxmsgs", 0),
    }


def cql_kind(statement: Any) -> str:
    """What a statement does, for counting: verb and table, a batch, a lightweight transaction (an
    ``IF`` condition, a Paxos round) or a SERIAL read (the Paxos read that settles an ambiguous LWT)."""
    if hasattr(statement, "_statements_and_parameters"):
        return "BATCH"
    query = getattr(getattr(statement, "prepared_statement", None), "query_string", None)
    query = query or getattr(statement, "query_string", None) or str(statement)
    verb = query.split(None, 1)[0].upper() if query.strip() else "?"
    table = _TABLE.search(query)
    kind = f"{verb} {table.group(1).rsplit('.', 1)[-1]}" if table else verb
    if verb in ("INSERT", "UPDATE", "DELETE") and _LWT.search(query):
        kind += " (LWT)"
    if getattr(statement, "consistency_level", None) in SERIAL_LEVELS:
        kind += " SERIAL (LWT read)"
    return kind


class CallCounts:
    """The counts of one process, written to ``<directory>/<pid>.json``."""

    _open: dict[tuple[Path, int], CallCounts] = {}
    _open_lock = threading.Lock()

    @classmethod
    def of(cls, directory: Path) -> CallCounts:
        """This process's counts in ``directory`` (one object, and one file, per process)."""
        key = (Path(directory), os.getpid())
        with cls._open_lock:
            if key not in cls._open:
                cls._open[key] = cls(Path(directory))
            return cls._open[key]

    @classmethod
    def when_on(cls, directory: Path | None) -> CallCounts | None:
        """This process's counts when ``directory`` (``Settings.call_counts_dir``) is set, else None."""
        return None if directory is None else cls.of(directory)

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{os.getpid()}.json"
        self.counts: dict[str, Counter[str]] = defaultdict(Counter)
        self.kafka: dict[str, dict[str, Any]] = {}  # client name -> kafka_summary of its latest statistics
        self.lock = threading.Lock()
        self.dirty = threading.Event()
        self.writing = threading.Lock()  # the flush thread and an explicit flush share the temporary file
        threading.Thread(target=self._flush_loop, name="call-counts", daemon=True).start()
        atexit.register(self.flush)

    def add(self, family: str, kind: str, n: int = 1) -> None:
        """Count ``n`` calls of ``kind`` in ``family`` (e.g. "s3 calls", "put_object"); flushed soon after."""
        with self.lock:
            self.counts[family][kind] += n
        self.dirty.set()

    def kafka_config(self) -> dict[str, Any]:
        """librdkafka properties that deliver each client's statistics here."""
        return {"statistics.interval.ms": STATS_INTERVAL_MS, "stats_cb": self._kafka_stats}

    def _kafka_stats(self, raw: str) -> None:
        stats = json.loads(raw)
        with self.lock:
            self.kafka[stats.get("name", "?")] = kafka_summary(stats)
        self.dirty.set()

    def count_s3(self, client: Any) -> None:
        """Count every S3 operation ``client`` calls (once per call; retries are not calls)."""
        client.meta.events.register("before-call.s3", lambda model, **_: self.add("s3 calls", model.name))

    def count_cql(self, session: Any) -> None:
        """Count every statement ``session`` sends (prepared, simple, batch)."""
        session.add_request_init_listener(lambda future: self.add("cql statements", cql_kind(future.query)))

    def count_aiokafka(self) -> None:
        """Count every request aiokafka sends in this process (faust's producer, consumer and admin)."""
        from aiokafka.conn import AIOKafkaConnection

        original = AIOKafkaConnection.send

        def send(conn: Any, request: Any, expect_response: bool = True) -> Any:
            self.add("kafka requests (aiokafka)", type(request).__name__.split("Request", 1)[0])
            return original(conn, request, expect_response)

        AIOKafkaConnection.send = send

    def snapshot(self) -> dict[str, Any]:
        """This process's counts and latest Kafka client statistics, as the file holds them."""
        with self.lock:
            return {
                "pid": os.getpid(),
                "counts": {family: dict(kinds) for family, kinds in self.counts.items()},
                "kafka": dict(self.kafka),
            }

    def flush(self) -> None:
        """Write the snapshot to this process's file now, atomically."""
        with self.writing:
            self.dirty.clear()
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.snapshot()), encoding="utf-8")
            tmp.replace(self.path)  # a reader never sees half a file

    def _flush_loop(self) -> None:
        while self.dirty.wait():
            self.flush()
            time.sleep(FLUSH_S)  # at most one write per FLUSH_S
