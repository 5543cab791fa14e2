"""The CQL in infra/cql applies to a real Cassandra; rows round-trip; terminal writes happen once."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import unquote

import pytest

from infra.bootstrap import cql_statements, ensure_schema
from plumbing.metadata import OutputRow, connect, register_types
from plumbing.settings import Settings
from stream_processors.assembler.store import AssemblyStore, TerminalRow, stored_tenant_id
from tests.conftest import unique


@pytest.fixture
def keyspace_settings(infra: Settings) -> Iterator[Settings]:
    settings = infra.model_copy(
        update={"cassandra": infra.cassandra.model_copy(update={"keyspace": unique("ks")})}
    )
    yield settings
    cluster, session = connect(settings.cassandra)
    session.execute(f"DROP KEYSPACE IF EXISTS {settings.cassandra.keyspace}", timeout=60)
    cluster.shutdown()


def test_schema_applies_and_reapplying_changes_nothing(keyspace_settings: Settings):
    created = ensure_schema(keyspace_settings)
    ks = keyspace_settings.cassandra.keyspace
    assert f"cassandra table {ks}.requests: created" in created
    assert f"cassandra table {ks}.requests_by_tenant: created" in created
    assert f"cassandra table {ks}.frames: created" in created
    assert ensure_schema(keyspace_settings) == []


def test_rows_round_trip_and_terminal_state_is_written_once(keyspace_settings: Settings):
    ensure_schema(keyspace_settings)
    ks = keyspace_settings.cassandra.keyspace
    cluster, session = connect(keyspace_settings.cassandra)
    register_types(cluster, ks)
    try:
        out = OutputRow("IMAGE", "b", "acme/2026/11/23/r1/image-0.png", "image/png", 123, "ab", 64, 64)
        insert = session.prepare(
            f"INSERT INTO {ks}.requests (request_id, tenant_id, status, outputs, prompt, finished_at) "
            "VALUES (?, ?, ?, ?, ?, ?) IF NOT EXISTS"
        )
        now = datetime.now(UTC).replace(microsecond=0)
        first = session.execute(insert, ("r1", "acme", "SUCCEEDED", [out], "一只猫", now)).one()
        assert first.applied
        second = session.execute(insert, ("r1", "acme", "FAILED", [], "x", now)).one()
        assert not second.applied
        assert second.status == "SUCCEEDED"  # the LWT answer carries the row that won
        row = session.execute(
            f"SELECT status, outputs, prompt FROM {ks}.requests WHERE request_id = 'r1'"
        ).one()
        assert row.status == "SUCCEEDED" and row.prompt == "一只猫"
        assert row.outputs == [out]

        session.execute(f"INSERT INTO {ks}.frames (request_id, frame_index, key) VALUES ('r1', 1, 'k1')")
        session.execute(f"INSERT INTO {ks}.frames (request_id, frame_index, key) VALUES ('r1', 0, 'k0')")
        keys = [r.key for r in session.execute(f"SELECT key FROM {ks}.frames WHERE request_id = 'r1'")]
        assert keys == ["k0", "k1"]

        for i, day in enumerate([1, 3, 2]):
            session.execute(
                f"INSERT INTO {ks}.requests_by_tenant (tenant_id, month, created_at, request_id) "
                "VALUES ('acme', '2026-11', %s, %s)",
                (datetime(2026, 11, day, tzinfo=UTC), f"h{i}"),
            )
        history = [
            r.request_id
            for r in session.execute(
                f"SELECT request_id FROM {ks}.requests_by_tenant "
                "WHERE tenant_id = 'acme' AND month = '2026-11'"
            )
        ]
        assert history == ["h1", "h2", "h0"]  # newest first
    finally:
        cluster.shutdown()


def test_cql_files_are_parameterised_by_settings(keyspace_settings: Settings):
    statements = cql_statements(keyspace_settings)
    assert statements[0].startswith(f"CREATE KEYSPACE IF NOT EXISTS {keyspace_settings.cassandra.keyspace}")
    assert all("${" not in s for s in statements)


@pytest.mark.parametrize("tenant", ["%", "tenant:*", "del\x7f", "\U0010ffff", "../etc", "acme"])
def test_a_rejected_requests_tenant_id_is_stored_escaped_and_handed_back_as_sent(
    keyspace_settings: Settings, tenant: str
):
    ensure_schema(keyspace_settings)
    ks = keyspace_settings.cassandra.keyspace
    cluster, session = connect(keyspace_settings.cassandra)
    register_types(cluster, ks)
    try:
        store = AssemblyStore(session, ks)
        now = datetime.now(UTC).replace(microsecond=0)
        values = TerminalRow(
            request_id="rej-1",
            tenant_id=tenant,
            status="REJECTED",
            reason_code="INVALID_TENANT_ID",
            message="tenant_id: must match the id pattern",
            outputs=[],
            created_at=now,
            finished_at=now,
            decided_by="t:0:1",
        )
        written = store.write_terminal(values)
        assert written.applied and written.row.tenant_id == tenant
        raw = session.execute(
            f"SELECT tenant_id, reason_code, message FROM {ks}.requests WHERE request_id = 'rej-1'"
        )
        row = raw.one()
        assert row.tenant_id == stored_tenant_id(tenant) and unquote(row.tenant_id) == tenant
        assert row.tenant_id.isascii() and row.tenant_id.isprintable()
        assert row.reason_code == "INVALID_TENANT_ID" and "tenant_id" in row.message
        # A second decision loses, and the row it is shown, like a read, carries the id as sent.
        again = store.write_terminal(dataclasses.replace(values, status="FAILED", decided_by="t:0:2"))
        assert not again.applied and again.row.tenant_id == tenant and again.row.status == "REJECTED"
        stored = store.terminal("rej-1")
        assert stored is not None and stored.tenant_id == tenant
    finally:
        cluster.shutdown()
