"""The write-once terminal insert settles an ambiguous timeout by a SERIAL read, never a blind retry.

A Cassandra WriteTimeout on a lightweight transaction may or may not have committed; this tests the
settling logic of `AssemblyStore.write_terminal` with a stand-in session (the real insert is covered
by the integration and chaos tests; a real timeout cannot be provoked on demand).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from cassandra import ConsistencyLevel, WriteTimeout
from cassandra.policies import WriteType

from stream_processors.assembler.store import AssemblyStore, TerminalRow


class Session:
    """Answers prepare() with named statements and execute() from a script of outcomes."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.calls: list[tuple[str, Any]] = []

    def prepare(self, query: str) -> SimpleNamespace:
        kind = "insert" if query.startswith("INSERT INTO ks.requests ") else "other"
        return SimpleNamespace(query=query, kind=kind, consistency_level=None, serial_consistency_level=None)

    def execute(self, statement: Any, params: Any = None) -> Any:
        self.calls.append((statement.kind, statement.consistency_level))
        outcome = self.script.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return SimpleNamespace(one=lambda: outcome)


def cas_timeout() -> WriteTimeout:
    """What the driver raises when a lightweight transaction times out in its Paxos round."""
    return WriteTimeout(
        "CAS operation timed out",
        consistency=ConsistencyLevel.SERIAL,
        required_responses=1,
        received_responses=0,
        write_type=WriteType.CAS,
    )


VALUES = TerminalRow(request_id="r1", tenant_id="t", status="SUCCEEDED", decided_by="frames:0:7")


def test_a_timeout_that_did_commit_is_recognised_by_the_serial_read():
    session = Session(
        [cas_timeout(), SimpleNamespace(decided_by="frames:0:7", status="SUCCEEDED", tenant_id="t")]
    )
    written = AssemblyStore(session, "ks").write_terminal(VALUES)  # type: ignore[arg-type]
    assert written.applied
    assert session.calls == [("insert", None), ("other", ConsistencyLevel.SERIAL)]  # read, no second insert


def test_a_timeout_that_lost_to_another_input_is_not_applied():
    session = Session(
        [cas_timeout(), SimpleNamespace(decided_by="decisions:2:1", status="REJECTED", tenant_id="t")]
    )
    written = AssemblyStore(session, "ks").write_terminal(VALUES)  # type: ignore[arg-type]
    assert not written.applied and written.row.status == "REJECTED"


def test_a_timeout_that_committed_nothing_is_proposed_again():
    applied = SimpleNamespace(applied=True)
    session = Session([cas_timeout(), None, applied])
    written = AssemblyStore(session, "ks").write_terminal(VALUES)  # type: ignore[arg-type]
    assert written.applied
    assert [kind for kind, _ in session.calls] == ["insert", "other", "insert"]
