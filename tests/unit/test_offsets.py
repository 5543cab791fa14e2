"""Committable offsets when tasks of a partition finish out of order."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_consumers.offsets import OffsetTracker

TOPIC = "aigc.render.gpu.normal"
OTHER = "aigc.render.gpu.high"


def tracker_with(offsets: range | list[int], topic: str = TOPIC, partition: int = 0) -> OffsetTracker:
    tracker = OffsetTracker()
    for offset in offsets:
        tracker.track(topic, partition, offset)
    return tracker


def test_nothing_is_committable_before_anything_is_done() -> None:
    tracker = tracker_with(range(5))
    assert tracker.committable() == {}
    assert tracker.in_flight() == 5


def test_out_of_order_completion_commits_only_the_contiguous_prefix() -> None:
    tracker = tracker_with(range(10, 15))
    tracker.done(TOPIC, 0, 12)
    tracker.done(TOPIC, 0, 13)
    assert tracker.committable() == {}  # 10 is still running
    tracker.done(TOPIC, 0, 10)
    assert tracker.committable() == {(TOPIC, 0): 11}  # 11 is still running
    tracker.done(TOPIC, 0, 11)
    assert tracker.committable() == {(TOPIC, 0): 14}  # 12 and 13 were done already
    assert tracker.in_flight() == 1
    tracker.done(TOPIC, 0, 14)
    assert tracker.committable() == {(TOPIC, 0): 15}  # everything done: the offset after the highest
    assert tracker.in_flight() == 0


def test_committable_reports_only_partitions_that_moved() -> None:
    tracker = OffsetTracker()
    for tp in [(TOPIC, 0), (TOPIC, 1), (OTHER, 0)]:
        for offset in range(3):
            tracker.track(*tp, offset)
    tracker.done(TOPIC, 0, 0)
    tracker.done(OTHER, 0, 1)  # not at the front: does not move
    assert tracker.committable() == {(TOPIC, 0): 1}
    assert tracker.committable() == {}  # nothing moved since
    tracker.done(TOPIC, 1, 0)
    tracker.done(OTHER, 0, 0)
    assert tracker.committable() == {(TOPIC, 1): 1, (OTHER, 0): 2}


def test_gaps_in_tracked_offsets_do_not_block_commits() -> None:
    # Offsets a consumer never sees (transaction markers, compacted records) are never tracked.
    tracker = tracker_with([3, 7, 8])
    tracker.done(TOPIC, 0, 3)
    assert tracker.committable() == {(TOPIC, 0): 7}
    tracker.done(TOPIC, 0, 8)
    tracker.done(TOPIC, 0, 7)
    assert tracker.committable() == {(TOPIC, 0): 9}


def test_done_for_an_untracked_partition_is_ignored() -> None:
    tracker = tracker_with(range(2))
    tracker.done(OTHER, 5, 0)
    assert tracker.committable() == {}
    assert tracker.in_flight() == 2


def test_forget_drops_a_partition() -> None:
    tracker = tracker_with(range(3))
    tracker.track(OTHER, 0, 0)
    tracker.done(TOPIC, 0, 1)
    tracker.forget(TOPIC, 0)
    assert tracker.in_flight() == 1
    # A late delivery report of the revoked partition changes nothing.
    tracker.done(TOPIC, 0, 0)
    assert tracker.committable() == {}
    # Assigned again later, it starts afresh from what is tracked then.
    tracker.track(TOPIC, 0, 40)
    tracker.done(TOPIC, 0, 40)
    assert tracker.committable() == {(TOPIC, 0): 41}
    tracker.forget("never", 9)  # forgetting an unknown partition is harmless


def test_tracking_after_a_commit_continues_from_the_new_offsets() -> None:
    tracker = tracker_with(range(2))
    tracker.done(TOPIC, 0, 0)
    tracker.done(TOPIC, 0, 1)
    assert tracker.committable() == {(TOPIC, 0): 2}
    tracker.track(TOPIC, 0, 2)
    tracker.track(TOPIC, 0, 3)
    tracker.done(TOPIC, 0, 3)
    assert tracker.committable() == {}
    tracker.done(TOPIC, 0, 2)
    assert tracker.committable() == {(TOPIC, 0): 4}


def check_random_completion(order: list[int], base: int, commit_every: int) -> None:
    """Finish ``order`` one by one, asking for commits now and then; a commit never passes an unfinished
    offset, and once everything is finished the commit is the offset after the highest."""
    high = base + len(order)
    tracker = tracker_with(range(base, high))
    finished: set[int] = set()
    committed = base
    for i, offset in enumerate(order, 1):
        tracker.done(TOPIC, 0, offset)
        finished.add(offset)
        if i % commit_every == 0:
            moved = tracker.committable().get((TOPIC, 0))
            if moved is not None:
                assert moved > committed  # only forward
                committed = moved
            # Exactly the first unfinished offset: everything below it is finished, it is not.
            assert committed == min(set(range(base, high + 1)) - finished)
    committed = tracker.committable().get((TOPIC, 0), committed)
    assert committed == high
    assert tracker.in_flight() == 0
    assert tracker.committable() == {}


def test_many_random_orders_never_commit_past_an_unfinished_offset() -> None:
    rng = random.Random(20240611)
    for _ in range(300):
        n = rng.randint(1, 60)
        order = list(range(100, 100 + n))
        rng.shuffle(order)
        tracker = tracker_with(range(100, 100 + n))
        finished: set[int] = set()
        last = 100
        for offset in order:
            tracker.done(TOPIC, 0, offset)
            finished.add(offset)
            moved = tracker.committable().get((TOPIC, 0))
            if moved is not None:
                assert moved > last
                last = moved
            assert all(o in finished for o in range(100, last))
            assert last == min(set(range(100, 100 + n + 1)) - finished)
        assert last == 100 + n


@settings(max_examples=200, deadline=None)
@given(
    order=st.integers(1, 40).flatmap(lambda n: st.permutations(list(range(n)))),
    commit_every=st.integers(1, 7),
    base=st.integers(0, 10**12),
)
def test_any_completion_order_eventually_commits_high_plus_one(
    order: list[int], commit_every: int, base: int
) -> None:
    check_random_completion([base + o for o in order], base, commit_every)
