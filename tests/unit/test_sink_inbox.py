"""The sink's inbox: most urgent class first, each partition in offset order, bounded batches."""

from __future__ import annotations

from dataclasses import dataclass

from plumbing.settings import Settings
from plumbing.topics import Topics
from stream_processors.assembler.inbox import Inbox

TOPICS = Topics(Settings.load(env={}))


@dataclass(frozen=True)
class Msg:
    t: str
    p: int
    offset: int

    def topic(self) -> str:
        return self.t

    def partition(self) -> int:
        return self.p


def inbox(high_water: int = 100) -> Inbox[Msg]:
    return Inbox(lambda topic: TOPICS.class_of(topic).rank, high_water)


def test_the_most_urgent_class_present_is_taken_first_whatever_arrived_before() -> None:
    box = inbox()
    lows = [Msg(TOPICS.decisions("LOW"), 0, i) for i in range(500)]
    box.add(lows)
    box.add([Msg(TOPICS.frames("HIGH"), 3, 7), Msg(TOPICS.decisions("NORMAL"), 1, 0)])
    assert box.take(lambda rank: 50) == [Msg(TOPICS.frames("HIGH"), 3, 7)]
    assert box.take(lambda rank: 50) == [Msg(TOPICS.decisions("NORMAL"), 1, 0)]
    first_low = box.take(lambda rank: 50)
    assert first_low == lows[:50]  # one partition: a prefix, in offset order
    box.add([Msg(TOPICS.decisions("HIGH"), 0, 9)])  # arrives while LOW work waits: goes next
    assert box.take(lambda rank: 50) == [Msg(TOPICS.decisions("HIGH"), 0, 9)]
    assert box.take(lambda rank: 50) == lows[50:100]
    assert len(box) == 400


def test_a_class_s_frames_and_decisions_share_its_turn_and_partitions_alternate() -> None:
    box = inbox()
    a = [Msg(TOPICS.frames("LOW"), 0, i) for i in range(3)]
    b = [Msg(TOPICS.decisions("LOW"), 2, i) for i in range(3)]
    box.add(a + b)
    batch = box.take(lambda rank: 4)
    assert sorted(batch, key=lambda m: (m.t, m.offset)) == sorted(
        a[:2] + b[:2], key=lambda m: (m.t, m.offset)
    )
    for part in (a, b):  # each partition's share is a prefix of what it had waiting
        taken = [m for m in batch if m.t == part[0].t]
        assert taken == part[: len(taken)]
    assert sorted(box.take(lambda rank: 4), key=lambda m: m.t) == sorted([a[2], b[2]], key=lambda m: m.t)


def test_dropped_partitions_forget_what_waits_and_crowded_ones_are_reported() -> None:
    box = inbox(high_water=2)
    low, normal = TOPICS.decisions("LOW"), TOPICS.frames("NORMAL")
    box.add([Msg(low, 0, i) for i in range(3)] + [Msg(normal, 1, 0)])
    assert box.crowded() == {(low, 0)}
    box.drop([(low, 0)])
    assert box.crowded() == set()
    assert box.drained([(low, 0), (normal, 1)]) == {(low, 0)}
    assert box.take(lambda rank: 10) == [Msg(normal, 1, 0)]
    assert box.take(lambda rank: 10) == []
