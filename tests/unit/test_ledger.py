"""The cost ledger's arithmetic and parsing: window differences, per-unit division, librdkafka
statistics, CQL statement kinds and /proc CPU times (no I/O beyond a saved statistics sample)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cassandra import ConsistencyLevel
from cassandra.query import BatchStatement, SimpleStatement

from bench.ledger import HZ, above_idle, call_totals, cpu_ms, difference, idle_rates, per_unit, scale
from plumbing.call_counts import SERIAL_LEVELS, CallCounts, cql_kind, kafka_summary

DATA = Path(__file__).parent / "data"


def test_a_window_is_the_difference_of_two_reads_key_by_key() -> None:
    before = {"seconds": 10.0, "kafka records": {"requests.normal": 5}, "cpu ms": {"kafka": 100.0}}
    after = {
        "seconds": 12.5,
        "kafka records": {"requests.normal": 25, "frames": 20},  # frames: created in the window
        "cpu ms": {"kafka": 160.0},
    }
    assert difference(before, after) == {
        "seconds": 2.5,
        "kafka records": {"requests.normal": 20, "frames": 20},
        "cpu ms": {"kafka": 60.0},
    }


def test_per_unit_divides_every_figure_and_leaves_zeros_out() -> None:
    delta = {"kafka records": {"requests.normal": 20, "dlq.sink": 0}, "s3 calls": {"PutObject": 40}}
    assert per_unit(delta, 20) == {"kafka records": {"requests.normal": 1.0}, "s3 calls": {"PutObject": 2.0}}
    assert per_unit(delta, 0) == {}  # nothing completed: no ledger, not a division by zero
    assert scale({"a": {"b": 0}}, 3) == {}


def test_idle_rates_are_per_second_and_above_idle_takes_the_idle_rate_off() -> None:
    idle = idle_rates(
        {"seconds": 0.0, "cpu ms": {"kafka": 0.0}, "calls": {"s3 calls": {}}},
        {"seconds": 10.0, "cpu ms": {"kafka": 50.0}, "calls": {"kafka requests (librdkafka)": {"Fetch": 30}}},
    )
    assert idle == {
        "window_s": 10.0,
        "per_second": {"cpu ms": {"kafka": 5.0}, "kafka requests (librdkafka)": {"Fetch": 3.0}},
    }
    window = {"window_s": 20.0, "units": 10, "totals": {"cpu ms": {"kafka": 300.0, "assembler": 40.0}}}
    assert above_idle(window, idle) == {"kafka": 20.0, "assembler": 4.0}


def test_librdkafka_statistics_reduce_to_requests_by_type_over_every_broker() -> None:
    stats = json.loads((DATA / "librdkafka_stats.json").read_text())
    extra = json.loads(json.dumps(next(iter(stats["brokers"].values()))))
    extra["req"] = {"Produce": 7, "Metadata": 1, "EndTxn": 0}
    extra["tx"], extra["txbytes"] = 8, 100
    stats["brokers"]["GroupCoordinator"] = extra  # the coordinator's connection counts too
    summary = kafka_summary(stats)
    assert summary["type"] == "producer"
    assert summary["requests"] == {"Metadata": 3, "ApiVersion": 1, "Produce": 7}  # zeros left out
    assert summary["requests_sent"] == sum(b["tx"] for b in stats["brokers"].values())


def test_call_totals_add_every_process_and_client() -> None:
    documents = [
        {"counts": {"s3 calls": {"PutObject": 2}}, "kafka": {"a#producer-1": {"requests": {"Produce": 3}}}},
        {
            "counts": {"s3 calls": {"PutObject": 1, "CopyObject": 1}},
            "kafka": {"b#consumer-2": {"requests": {"Fetch": 9, "Produce": 1}}},
        },
    ]
    totals = call_totals(documents)
    assert totals["s3 calls"] == {"PutObject": 3, "CopyObject": 1}
    assert totals["kafka requests (librdkafka)"] == {"Produce": 4, "Fetch": 9}
    assert totals["kafka messages (librdkafka clients)"] == {"produced": 0, "consumed": 0}


def test_cql_kinds_name_the_table_and_the_paxos_rounds() -> None:
    assert SERIAL_LEVELS == (ConsistencyLevel.SERIAL, ConsistencyLevel.LOCAL_SERIAL)
    lwt = SimpleStatement("INSERT INTO ks.requests (request_id) VALUES (%s) IF NOT EXISTS")
    assert cql_kind(lwt) == "INSERT requests (LWT)"
    serial = SimpleStatement("SELECT status FROM ks.requests WHERE request_id = %s")
    serial.consistency_level = ConsistencyLevel.SERIAL
    assert cql_kind(serial) == "SELECT requests SERIAL (LWT read)"
    assert cql_kind(SimpleStatement("UPDATE ks.t SET a = 1 WHERE k = 2 IF a = 0")) == "UPDATE t (LWT)"
    assert cql_kind(SimpleStatement("INSERT INTO ks.frames (a) VALUES (1)")) == "INSERT frames"
    assert cql_kind(BatchStatement()) == "BATCH"


def test_cpu_ms_reads_user_and_system_time_of_a_process_and_its_waited_children() -> None:
    # pid (comm) state ppid ... utime stime cutime cstime (fields 14-17); a name with spaces and ")"
    stat = "42 (python (x) y) S 1 42 42 0 -1 4194304 100 0 0 0 250 50 7 3 20 0 4 0 100 0 0"
    assert cpu_ms(stat) == pytest.approx((250 + 50 + 7 + 3) * 1000 / HZ)


def test_a_process_writes_its_counts_to_one_file(tmp_path: Path) -> None:
    counts = CallCounts.of(tmp_path)
    assert CallCounts.of(tmp_path) is counts
    assert CallCounts.when_on(None) is None
    counts.add("s3 calls", "PutObject", 2)
    counts.kafka_config()["stats_cb"]((DATA / "librdkafka_stats.json").read_text())
    counts.flush()
    written = json.loads(counts.path.read_text())
    assert written["counts"] == {"s3 calls": {"PutObject": 2}}
    assert next(iter(written["kafka"].values()))["requests"]["ApiVersion"] == 1
