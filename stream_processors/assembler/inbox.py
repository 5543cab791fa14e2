"""The sink's inbox: fetched messages waiting to be handled, taken most urgent class first.

The sink consumes each class's decisions and frames (``aigc.decisions.<class>``, ``aigc.frames.<class>``).
A flood of shed LOW requests puts thousands of LOW decisions in front of the sink; a HIGH request's frames
must not wait behind them. Each fetch goes into the inbox, partition by partition in offset order, and the
sink takes its next batch from the most urgent class present only: every message of a partition is handled
in order (a batch takes a prefix of each partition's queue, so committing the batch's end offsets never
skips a message), while a less urgent class waits between batches, bounded in size so that what arrives
for a more urgent class meanwhile waits for one batch at most.

A partition holding more than ``high_water`` waiting messages is paused (librdkafka keeps its position
after the last message delivered, so resuming fetches on from there) and resumed once it is drained.
Messages of a partition the sink loses (rebalance) or must fetch again (a failed transaction) are dropped
from the inbox: they were not committed, so the next fetch of that partition delivers them again.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import Generic, Protocol, TypeVar

TopicPartitionKey = tuple[str, int]


class Fetched(Protocol):
    """What the inbox needs of a fetched message (a confluent-kafka ``Message`` has it)."""

    def topic(self) -> str | None:
        """The topic the message was fetched from."""
        ...

    def partition(self) -> int | None:
        """The partition the message was fetched from."""
        ...


M = TypeVar("M", bound=Fetched)


class Inbox(Generic[M]):
    """Per-partition queues of fetched messages, taken most urgent first."""

    def __init__(self, rank: Callable[[str], int], high_water: int) -> None:
        self.rank = rank  # topic -> 0 for the most urgent class
        self.high_water = high_water
        self.queues: dict[TopicPartitionKey, collections.deque[M]] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def add(self, messages: Iterable[M]) -> None:
        """Queue fetched ``messages`` behind what waits for their partitions, in the order given."""
        for msg in messages:
            key = (msg.topic() or "", msg.partition() or 0)
            self.queues.setdefault(key, collections.deque()).append(msg)

    def take(self, limits: Callable[[int], int]) -> list[M]:
        """The next batch: waiting messages of the most urgent class present, at most ``limits(rank)``,
        spread over its partitions in turn, each partition's in offset order."""
        waiting = {key: q for key, q in self.queues.items() if q}
        if not waiting:
            return []
        top = min(self.rank(topic) for topic, _ in waiting)
        queues = [q for (topic, _), q in sorted(waiting.items()) if self.rank(topic) == top]
        limit = limits(top)
        batch: list[M] = []
        while queues and len(batch) < limit:
            for q in list(queues):
                batch.append(q.popleft())
                if not q:
                    queues.remove(q)
                if len(batch) == limit:
                    break
        return batch

    def drop(self, partitions: Iterable[TopicPartitionKey]) -> None:
        """Forget what waits for ``partitions``: it will be fetched again."""
        for key in partitions:
            self.queues.pop(key, None)

    def crowded(self) -> set[TopicPartitionKey]:
        """Partitions holding more than ``high_water`` waiting messages (to pause)."""
        return {key for key, q in self.queues.items() if len(q) > self.high_water}

    def drained(self, among: Iterable[TopicPartitionKey]) -> set[TopicPartitionKey]:
        """Those of ``among`` with nothing waiting (to resume)."""
        return {key for key in among if not self.queues.get(key)}
