"""The gatekeeper's repairs to faust's at-least-once bookkeeping (gatekeeper/faust_fixes.py).

Each test is a case faust-streaming 0.15.3 gets wrong: a request skipped without being handled.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import faust
import pytest
from faust.exceptions import PartitionsMismatch
from faust.types import TP
from mode.utils.queues import FlowControlQueue

from plumbing.settings import Settings
from stream_processors.gatekeeper import faust_fixes
from stream_processors.gatekeeper.app import create_app, make_gate

TOPIC = TP("aigc.requests.low", 0)


@pytest.fixture
def app(tmp_path: Path) -> faust.App:
    settings = Settings.load(home=tmp_path)
    return create_app(settings, make_gate(settings, None))


def repaired(app: faust.App) -> faust_fixes.Consumer:
    consumer = app.consumer
    assert isinstance(consumer, faust_fixes.Consumer)
    return consumer


def test_the_gatekeeper_app_runs_with_the_repairs(app: faust.App) -> None:
    assert isinstance(app.flow_control, faust_fixes.FlowControl)
    assert isinstance(app.consumer, faust_fixes.Consumer)


def test_a_resume_while_flowing_keeps_the_records_already_buffered(app: faust.App) -> None:
    """faust's recovery resumes again after its seek: the records fetched meanwhile must stay."""
    flow = app.flow_control
    buffer: FlowControlQueue[int] = FlowControlQueue(flow_control=flow, clear_on_resume=True)
    flow.resume()
    buffer.put_nowait(2)
    flow.resume()
    assert buffer.qsize() == 1
    flow.suspend()  # a rebalance: what is buffered belongs to the revoked assignment
    flow.resume()
    assert buffer.qsize() == 0


def test_no_commit_passes_an_unhandled_offset_at_the_head(app: faust.App) -> None:
    """faust-streaming#606: committed 2 and acked [3, 4, 5] committed 6, and the record at 2 was lost."""
    consumer = repaired(app)
    consumer._committed_offset[TOPIC] = 2
    consumer._acked[TOPIC] = [3, 4, 5]
    consumer._acked_index[TOPIC] = {3, 4, 5}
    assert consumer._new_offset(TOPIC) is None
    consumer._acked[TOPIC].append(2)
    consumer._acked_index[TOPIC].add(2)
    assert consumer._new_offset(TOPIC) == 6
    assert consumer._acked[TOPIC] == []


def test_a_hole_at_the_committed_offset_after_a_seek_is_committed_over(app: faust.App) -> None:
    """A transaction marker at the committed offset: the first record read after the seek is one past it."""
    consumer = repaired(app)

    async def seek_to_committed() -> dict[TP, int]:  # the broker's answer
        return {TOPIC: 5}

    consumer.seek_to_committed = seek_to_committed  # type: ignore[method-assign]
    asyncio.run(consumer.perform_seek())
    assert consumer._committed_offset[TOPIC] == 5
    read_offset = consumer._read_offset[TOPIC]
    assert read_offset == 4
    # the fetch loop records the hole between its read offset and the record it got, as faust does
    asyncio.run(consumer._add_gap(TOPIC, read_offset + 1, 6))
    consumer._acked[TOPIC] = [6]
    consumer._acked_index[TOPIC] = {6}
    assert consumer._new_offset(TOPIC) == 7


def test_holes_inside_the_acked_run_are_filled(app: faust.App) -> None:
    consumer = repaired(app)
    consumer._committed_offset[TOPIC] = 10
    asyncio.run(consumer._add_gap(TOPIC, 12, 13))
    consumer._acked[TOPIC] = [10, 11, 14, 15]
    consumer._acked_index[TOPIC] = {10, 11, 14, 15}
    assert consumer._new_offset(TOPIC) == 16


def test_a_partition_never_committed_on_holds_commits_until_its_first_record_is_handled(
    app: faust.App,
) -> None:
    """Nothing committed yet: the log start counts as committed, so acked [1, 2] commit nothing."""
    consumer = repaired(app)

    async def seek_to_committed() -> dict[TP, int | None]:  # the broker's answer: no commit
        return {TOPIC: None}

    async def earliest_offsets(*partitions: TP) -> dict[TP, int]:
        return dict.fromkeys(partitions, 0)

    consumer.seek_to_committed = seek_to_committed  # type: ignore[method-assign,assignment]
    consumer.earliest_offsets = earliest_offsets  # type: ignore[method-assign]
    asyncio.run(consumer.perform_seek())
    assert consumer._committed_offset[TOPIC] == 0
    consumer._acked[TOPIC] = [1, 2]
    consumer._acked_index[TOPIC] = {1, 2}
    assert consumer._new_offset(TOPIC) is None  # the record at 0 is not handled
    consumer._acked[TOPIC].append(0)
    consumer._acked_index[TOPIC].add(0)
    assert consumer._new_offset(TOPIC) == 3


class _Thread:
    """The consumer thread's answer to an earliest-offset lookup: aiokafka's UNKNOWN_OFFSET for one."""

    async def earliest_offsets(self, *partitions: TP) -> dict[TP, int]:
        return {tp: -1 if tp == TOPIC else 7 for tp in partitions}


def test_an_unknown_log_start_is_no_offset_so_recovery_never_seeks_below_zero(app: faust.App) -> None:
    consumer = repaired(app)
    other = TP("aigc.gatekeeper.seen.changelog", 1)
    consumer._thread = _Thread()  # type: ignore[assignment]
    assert asyncio.run(consumer.earliest_offsets(TOPIC, other)) == {other: 7}
    # faust's recovery: no persisted offset (a memory store) and no log start -> it reads from the start
    recovery = app.tables.recovery
    offsets: Counter[TP] = Counter()
    offsets[TOPIC] = None  # type: ignore[assignment]  # what faust stores for an unpersisted table
    asyncio.run(recovery._build_offsets(consumer, {TOPIC, other}, offsets, "active"))
    assert offsets[TOPIC] == -1 and offsets[other] == 6  # seeks 0 and 6 (before: -2, which aiokafka refuses)


def test_a_never_committed_partition_with_an_unknown_start_holds_commits_from_zero(app: faust.App) -> None:
    consumer = repaired(app)

    async def seek_to_committed() -> dict[TP, int | None]:
        return {TOPIC: None}

    consumer.seek_to_committed = seek_to_committed  # type: ignore[method-assign,assignment]
    consumer._thread = _Thread()  # type: ignore[assignment]
    asyncio.run(consumer.perform_seek())
    assert consumer._committed_offset[TOPIC] == 0
    consumer._acked[TOPIC] = [1]
    consumer._acked_index[TOPIC] = {1}
    assert consumer._new_offset(TOPIC) is None


class _Holes(faust_fixes.HoleCheck):
    """The broker's answer: records at ``present``; every other offset is a hole."""

    def __init__(self, present: set[int]) -> None:
        super().__init__(lambda: None)
        self.present, self.asked = present, []

    def records_at(self, topic: str, partition: int, offsets) -> set[int]:
        self.asked.append(list(offsets))
        return self.present & set(offsets)


def _stale_batch_after_a_seek(
    app: faust.App, holes: _Holes, monkeypatch
) -> tuple[faust_fixes.Consumer, list]:
    """Committed 31, read offset set back to 30 by the seek, then record 34 of a batch fetched before it:
    faust records 31-34 as holes (7. in faust_fixes); 34 is handled."""
    consumer = repaired(app)
    app.hole_check = holes  # type: ignore[attr-defined]
    consumer._committed_offset[TOPIC] = 31
    asyncio.run(consumer._add_gap(TOPIC, 31, 34))
    consumer._acked[TOPIC] = [34]
    consumer._acked_index[TOPIC] = {34}
    committed: list = []

    async def commit(self, offsets):  # the broker's side of a commit
        committed.append(dict(offsets))
        return True

    def fake_exit(status: int) -> None:
        raise SystemExit(status)

    monkeypatch.setattr(faust_fixes.AIOKafkaConsumer, "_commit", commit)
    monkeypatch.setattr(faust_fixes.os, "_exit", fake_exit)
    return consumer, committed


def test_holes_that_hold_records_end_the_worker_before_the_commit(app: faust.App, monkeypatch) -> None:
    holes = _Holes(present={31, 32, 33})
    consumer, committed = _stale_batch_after_a_seek(app, holes, monkeypatch)
    offset = consumer._new_offset(TOPIC)
    assert offset == 35  # faust's bookkeeping would commit over 31-33
    with pytest.raises(SystemExit) as exited:
        asyncio.run(consumer._commit({TOPIC: offset}))
    assert exited.value.code == faust_fixes.HoleCheck.EXIT_STATUS and committed == []
    assert holes.asked == [[31, 32, 33]]  # 34 was handled: not asked


def test_real_holes_are_committed_over(app: faust.App, monkeypatch) -> None:
    holes = _Holes(present=set())  # transaction markers at 31-33
    consumer, committed = _stale_batch_after_a_seek(app, holes, monkeypatch)
    offset = consumer._new_offset(TOPIC)
    assert asyncio.run(consumer._commit({TOPIC: offset})) is True
    assert committed == [{TOPIC: 35}]
    assert asyncio.run(consumer._commit({TOPIC: 36})) is True
    assert holes.asked == [[31, 32, 33]]  # confirmed once


def test_offsets_the_handler_finished_are_not_asked_about(app: faust.App, monkeypatch) -> None:
    """faust's bookkeeping can miss an ack (seen in `make chaos`: a record handled once between a stale
    batch and the seek); the handler's own record of it keeps the worker from exiting for nothing."""
    holes = _Holes(present={31, 32, 33})
    consumer, committed = _stale_batch_after_a_seek(app, holes, monkeypatch)
    deliveries: faust_fixes.Deliveries = app.deliveries  # type: ignore[attr-defined]
    for offset in (31, 32, 33):
        deliveries.done(TOPIC.topic, TOPIC.partition, offset)
    assert asyncio.run(consumer._commit({TOPIC: consumer._new_offset(TOPIC)})) is True
    assert committed == [{TOPIC: 35}] and holes.asked == []
    assert not deliveries.handled[TOPIC]  # forgotten once committed


def test_offsets_below_the_committed_one_are_not_asked_about(app: faust.App, monkeypatch) -> None:
    """A hole interval left from before the last commit reaches below it: those offsets were committed
    already (handled, in `make chaos`), so asking about them would end a worker for nothing."""
    holes = _Holes(present={40, 41, 42})
    consumer, committed = _stale_batch_after_a_seek(app, holes, monkeypatch)
    consumer._gap[TOPIC].clear()
    consumer._committed_offset[TOPIC] = 43
    consumer._gap[TOPIC].addi(40, 44)
    consumer._acked[TOPIC] = [44]
    consumer._acked_index[TOPIC] = {44}
    assert consumer._new_offset(TOPIC) == 45
    assert asyncio.run(consumer._commit({TOPIC: 45})) is True
    assert committed == [{TOPIC: 45}] and holes.asked == [[43]]


def test_a_failed_delivery_ends_the_worker_before_its_offset_is_committed(
    app: faust.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send whose delivery failed after the agent moved on: the process exits instead of committing
    (were the commit made, the not-started consumer under it would raise something else)."""
    consumer = repaired(app)
    deliveries: faust_fixes.Deliveries = app.deliveries  # type: ignore[attr-defined]
    exits: list[int] = []

    def fake_exit(status: int) -> None:
        exits.append(status)
        raise SystemExit(status)

    monkeypatch.setattr(faust_fixes.os, "_exit", fake_exit)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        delivered, failed = loop.create_future(), loop.create_future()
        delivered.set_result("ok")
        deliveries.track(delivered)
        await deliveries.settle()  # all delivered: nothing happens
        assert exits == [] and deliveries.pending == []
        failed.set_exception(RuntimeError("KafkaTimeoutError: batch expired"))
        deliveries.track(failed)
        with pytest.raises(SystemExit):
            await consumer._commit({TOPIC: 3})

    asyncio.run(run())
    assert exits == [faust_fixes.Deliveries.EXIT_STATUS]


def test_a_changelog_missing_from_the_metadata_is_unknown_not_a_partition_mismatch(app: faust.App) -> None:
    """8. in faust_fixes: aiokafka counted a just-created changelog as 0 partitions and faust's first table
    write raised PartitionsMismatch in the agent; a real mismatch still raises."""
    consumer = repaired(app)
    seen = app.tables["seen"]
    source = "aigc.requests.high"
    snapshot = {source: 2, seen.changelog_topic_name: 0}
    consumer._thread._consumer = SimpleNamespace(_coordinator=SimpleNamespace(_metadata_snapshot=snapshot))
    assert consumer.topic_partitions(seen.changelog_topic_name) is None
    assert consumer.topic_partitions("not.in.the.group") is None
    seen._verify_source_topic_partitions(source)
    buckets = app.tables["buckets"]
    snapshot[buckets.changelog_topic_name] = 3
    with pytest.raises(PartitionsMismatch):
        buckets._verify_source_topic_partitions(source)


def test_a_recovery_seek_without_an_offset_starts_at_zero(app: faust.App, monkeypatch) -> None:
    """9. in faust_fixes: a rebalance during table recovery left standby partitions without an offset in
    the set the running recovery seeks, and aiokafka's seek raised ValueError, ending the gatekeeper."""
    consumer = repaired(app)
    sought: list[dict[TP, int]] = []

    async def seek_wait(self, partitions):  # the thread's seek, which rejects None and negatives
        sought.append(dict(partitions))

    monkeypatch.setattr(faust_fixes.AIOKafkaConsumer, "seek_wait", seek_wait)
    changelog = "aigc.gatekeeper.seen.changelog"
    asyncio.run(consumer.seek_wait({TP(changelog, 0): None, TP(changelog, 1): -1, TP(changelog, 2): 7}))
    assert sought == [{TP(changelog, 0): 0, TP(changelog, 1): 0, TP(changelog, 2): 7}]
