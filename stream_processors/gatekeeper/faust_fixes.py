"""Nine repairs to faust-streaming 0.15.3's at-least-once bookkeeping, installed on the gatekeeper's app.

`aigc chaos` lost a request this way (CI, seed 20261123: the gatekeeper restarted while requests waited):

1. faust's recovery resumes the request partitions while its fetcher runs, awaits the seek to the
   committed offsets, then calls ``flow_control.resume()`` again. mode's ``FlowControlEvent.resume``
   clears every stream buffer even when flow is already on, so records delivered in that window are
   thrown away unacknowledged, and the fetch loop's read offset has already moved past them, so the
   re-read after the seek skips them too. `FlowControl` clears only on a real resume (flow was
   suspended: the buffers then hold records of a revoked assignment, which faust re-reads anyway).
2. ``Consumer._new_offset`` commits over one unacknowledged offset at the head of a partition
   (faust-streaming#606; the fix, PR #707, is unreleased): committed 2 and acked [3, 4, 5] commits 6,
   so the record at 2 is never handled. `Consumer` commits past the committed offset only when it was
   acknowledged or is a known hole.
3. faust records a hole (a transaction marker, a compacted record) only from the fetch loop's read
   offset, which after a seek is the committed offset itself (the next to read, not the last read) and
   ``_add_gap`` clamps to one past the committed offset: a hole right at the committed offset is never
   recorded, which faust's lenient check in 2 papers over. `Consumer` sets the read offset after a seek
   to the one before the committed offset and lets a hole start at the committed offset.

4. With two gatekeepers, `aigc chaos` on the 3-broker cluster lost a request whose record was the first
   of a partition the group had never committed on: the check in 2 had no committed offset to hold a
   commit back with (and ``0 or None`` made a committed 0 count as none), so acked [1, 2] committed 3
   over the unhandled record at 0. `Consumer.perform_seek` now takes a never-committed partition's log
   start as its committed offset.
5. faust flushes its producer before it commits, but a send that failed on delivery (aiokafka gives up on
   a batch whose partition had no leader for its request timeout, as when a broker is SIGKILLed) leaves
   the buffer like a delivered one, so the offset would be committed over a request whose render task or
   status was never written (read in the code; not yet seen in a run). `Deliveries` holds every send's
   future; `Consumer` awaits them before each commit and, when one failed, exits the process without
   committing, so the request is read again.

6. aiokafka answers an earliest-offset lookup with -1 (UNKNOWN_OFFSET) when the ListOffsets response
   carries no offset; faust's table recovery subtracts one and seeks a changelog to -2, and aiokafka raises
   ``ValueError: Offset must be a positive integer``, which ended a gatekeeper in a `make chaos` broker kill
   (seed 465109); the repair in 4 would take -1 as a committed offset. `Consumer.earliest_offsets` leaves
   a negative offset out (faust's recovery then reads the changelog from its start), and
   `Consumer.perform_seek` takes a never-committed partition with an unknown log start as committed at 0.

7. `make chaos` lost three requests (seed 461387: requests.high[5] offsets 31-33, never handled, were
   committed over: the group's commits went 31 -> 35 right after a worker that had just been assigned
   the partition handled offset 34, twice). faust's recovery resumes the stream partitions before it seeks
   them to the committed offsets, so a batch fetched before the seek can still be handed out after it; the
   seek sets the read offset back (30), the stale batch's next record (34) then looks like a jump, and
   faust records 31-34 as holes, which 2 commits over. Holes are rare in request topics (a transactional
   producer's markers), so `Consumer._commit` now confirms them: before committing over offsets it filled
   in as holes, it reads them from the broker (`HoleCheck`); if one holds a record the process exits
   without committing, and the partition is read again from the committed offset. Offsets the handler
   finished (`Deliveries.done`) are not asked about: faust's own acks missed some in `make chaos`.

8. Both CI-sized chaos runs of a change that made gatekeepers start sooner lost three requests: on the
   3-broker cluster a gatekeeper joined its group a second after faust created the tables' changelog
   topics, the broker that answered its metadata request did not know them yet, and aiokafka's group
   coordinator keeps that answer (the changelog "has 0 partitions") until its next metadata refresh,
   minutes later. faust checks a table's source and changelog partitions on the first write from each
   source topic and raised ``PartitionsMismatch`` (2 against 0) in the agent, which faust restarted,
   counting the event as done (`app.Handler.handle` now ends the process instead). A topic has at least
   one partition, so `Consumer.topic_partitions` answers 0 as unknown (None), which faust's check skips.

9. In `make chaos` (seed 231170) both gatekeepers exited once at start with ``ValueError: Offset must be a
   positive integer`` in table recovery: a rebalance came while recovery was reading the changelogs; the
   new assignment added standby partitions with no offset (None) to the set the running recovery then
   seeks before it checks for the new rebalance. `Consumer.seek_wait` seeks a partition without an offset
   (or with a negative one) to 0, as faust seeks its own -1; the recovery of the new assignment seeks again.

A partition that still misses an offset now stops committing rather than skipping it; the stall guard
(`stall.py`) then restarts the worker, which reads again from the committed offset (`Gate.admit` makes
the repeat harmless).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import faust
from faust.transport.consumer import ensure_TP
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.types import TP
from faust.utils.functional import consecutive_numbers
from mode.utils.queues import FlowControlEvent

log = logging.getLogger(__name__)


class FlowControl(FlowControlEvent):
    """mode's flow control, whose resume clears the stream buffers only when flow was suspended."""

    def resume(self) -> None:
        """Let flow go on; the buffers are cleared only when it was suspended."""
        was_suspended = not self.is_active()
        self._suspend.clear()
        self._resume.set()
        if was_suspended:
            self.clear()


class Deliveries:
    """The sends of the handled events whose delivery has not been checked yet (see 5. above), and the
    offsets the handler finished since the last commit (not holes, whatever faust's bookkeeping says: 7.)."""

    EXIT_STATUS = 70

    def __init__(self) -> None:
        self.pending: list[asyncio.Future[Any]] = []
        self.handled: defaultdict[TP, set[int]] = defaultdict(set)

    def done(self, topic: str, partition: int, offset: int) -> None:
        """The handler finished the record at ``offset`` (its outputs sent, their delivery tracked)."""
        self.handled[TP(topic, partition)].add(offset)

    def track(self, sent: asyncio.Future[Any]) -> None:
        """Check ``sent`` (a send's delivery future) before the next commit."""
        self.pending.append(sent)

    async def settle(self) -> None:
        """Wait for every tracked delivery (the producer was just flushed: they are done or about to be);
        exit the process when one failed, before anything is committed over it (5. above)."""
        pending, self.pending = self.pending, []
        for result in await asyncio.gather(*pending, return_exceptions=True):
            if isinstance(result, BaseException):
                log.critical(
                    "a send failed (%r); exiting before the commit, so its request is read again", result
                )
                logging.shutdown()
                os._exit(self.EXIT_STATUS)


class HoleCheck:
    """Which of some offsets of a partition hold a record, asked of the broker (7. above). Any answer it
    cannot get counts as a record: the caller then exits rather than commit over it."""

    EXIT_STATUS = 70

    def __init__(self, make_reader: Callable[[], Any]) -> None:
        self._make_reader = make_reader  # a confluent_kafka Consumer, made on first use
        self._reader: Any = None

    def records_at(self, topic: str, partition: int, offsets: Sequence[int]) -> set[int]:
        """The offsets in ``offsets`` where the partition holds a record (not a hole)."""
        from confluent_kafka import TopicPartition

        if self._reader is None:
            self._reader = self._make_reader()
        found: set[int] = set()
        for offset in sorted(set(offsets)):
            self._reader.assign([TopicPartition(topic, partition, offset)])
            msg = self._reader.poll(10.0)  # the first record at or after ``offset``
            if msg is None or msg.error() is not None or msg.offset() <= offset:
                found.add(offset)  # a record there, or no answer: not a hole
        return found


class Consumer(AIOKafkaConsumer):
    """faust's aiokafka consumer, committing past an offset only once it is handled or known absent, and
    only once every send made so far was delivered."""

    @property
    def _filled(self) -> defaultdict[TP, set[int]]:
        """Per partition, the offsets `_new_offset` counted as holes and no commit has confirmed yet."""
        filled = self.__dict__.get("_filled_holes")
        if filled is None:
            filled = self.__dict__["_filled_holes"] = defaultdict(set)
        return filled

    def topic_partitions(self, topic: str) -> int | None:
        """The partitions of ``topic`` as the group coordinator last saw them; None while unknown (8. above:
        aiokafka counts a topic missing from its metadata as 0)."""
        return super().topic_partitions(topic) or None

    async def seek_wait(self, partitions: Mapping[TP, int | None]) -> None:
        """Seek each changelog partition for table recovery; one without an offset, or a negative one, to
        0 (9. above)."""
        await super().seek_wait(
            {tp: offset if offset and offset > 0 else 0 for tp, offset in partitions.items()}
        )

    async def _commit(self, offsets: Mapping[TP, int]) -> bool:
        deliveries: Deliveries = self.app.deliveries  # type: ignore[attr-defined]  # set by `install`
        await deliveries.settle()
        await self._confirm_holes(offsets)
        return bool(await super()._commit(offsets))

    async def _confirm_holes(self, offsets: Mapping[TP, int]) -> None:
        """Before committing ``offsets``, make sure the holes they pass over hold no record (7. above);
        exit the process, committing nothing, when one does."""
        check: HoleCheck | None = getattr(self.app, "hole_check", None)
        deliveries: Deliveries = self.app.deliveries  # type: ignore[attr-defined]
        for tp, offset in offsets.items():
            handled = deliveries.handled.get(tp, set())
            filled = self._filled.get(tp)
            gone = [o for o in handled if o < offset]
            handled.difference_update(gone)
            if not filled:
                continue
            passed = sorted(o for o in filled if o < offset)
            filled.difference_update(passed)
            passed = [o for o in passed if o not in gone]  # the handler finished these: not holes
            if not passed or check is None:
                continue
            found = await asyncio.to_thread(check.records_at, tp.topic, tp.partition, passed)
            if found:
                log.critical(
                    "%s offsets %s were counted as holes but hold records; exiting without committing %d, "
                    "so they are read again",
                    tp,
                    sorted(found),
                    offset,
                )
                logging.shutdown()
                os._exit(HoleCheck.EXIT_STATUS)

    def _new_offset(self, tp: TP) -> int | None:
        acked = self._acked[tp]
        if not acked:
            return None
        gaps = self._gap[tp]
        if gaps:  # known holes below the highest acked offset count as handled (as in faust)
            max_offset = max(acked)
            holes = sorted(gaps.overlap(0, max_offset), key=lambda interval: interval.begin)
            if holes:
                filled = [offset for hole in holes for offset in range(hole.begin, hole.end)]
                acked.extend(filled)
                # To confirm before the commit (7. above): not handled, and not committed already (an
                # interval left over from before the last commit can reach below it).
                floor = self._committed_offset[tp] or 0
                self._filled[tp].update(o for o in filled if o >= floor and o not in self._acked_index[tp])
                gaps.chop(0, max(filled[-1], max_offset + 1))
        acked.sort()
        committed = self._committed_offset[tp]
        if committed is not None and acked[0] > committed:
            return None  # the record at the committed offset is not handled yet: commit nothing
        batch = next(consecutive_numbers(acked))
        acked[: len(batch)] = []
        self._acked_index[tp].difference_update(batch)
        return batch[-1] + 1

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        committed = self._committed_offset[tp]
        if committed is not None:
            offset_from = max(offset_from, committed)
        if offset_from <= offset_to:
            gaps = self._gap[tp]
            gaps.addi(offset_from, offset_to + 1)
            gaps.merge_overlaps()

    async def perform_seek(self) -> None:
        """Seek to the committed offsets and record them, with the read offset one before each. A
        partition this group never committed on counts as committed at its log start: otherwise the
        check in `_new_offset` has nothing to hold a commit back with, and a first record dropped from a
        buffer in a rebalance is committed over (a request lost with two gatekeepers in `aigc chaos`)."""
        committed = dict(await self.seek_to_committed())
        for tp in committed:
            self._filled.pop(ensure_TP(tp), None)  # read again from the committed offset
        fresh = [ensure_TP(tp) for tp, offset in committed.items() if offset is None]
        if fresh:
            starts = await self.earliest_offsets(*fresh)
            # An unknown start (6. above) counts as 0: commits wait for the first record there; when the
            # log starts later, the stall guard restarts the worker and the next lookup knows the start.
            committed.update({tp: starts.get(tp) or 0 for tp in fresh})
        for tp, offset in committed.items():
            # the fetch loop's read offset is the last offset read (faust sets the next one)
            self._read_offset[ensure_TP(tp)] = offset - 1 if offset and offset > 0 else None
            if offset is not None:  # 0 too: nothing below it is handled, so offset 0 must be acked first
                self._committed_offset[ensure_TP(tp)] = offset

    async def earliest_offsets(self, *partitions: TP) -> Mapping[TP, int]:
        """The log start of each partition; a negative answer (aiokafka's UNKNOWN_OFFSET) is left out,
        as a partition the lookup did not answer for (6. above)."""
        found = await super().earliest_offsets(*partitions)
        return {tp: offset for tp, offset in found.items() if offset is not None and offset >= 0}


def install(app: faust.App, hole_check: HoleCheck | None = None) -> Deliveries:
    """Give ``app`` the repaired flow control and consumer; call before the app starts. Returns the
    `Deliveries` its senders must `Deliveries.track` each send's delivery with. ``hole_check``: how the
    consumer confirms holes before committing over them (7. above); without one they are trusted."""
    app.flow_control = FlowControl(loop=app.loop)  # faust caches it on first use
    deliveries = app.deliveries = Deliveries()  # type: ignore[attr-defined]
    app.hole_check = hole_check  # type: ignore[attr-defined]
    transport: Any = app.transport
    transport.Consumer = Consumer
    return deliveries
