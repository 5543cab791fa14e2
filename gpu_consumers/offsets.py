"""Which offsets are safe to commit when tasks finish out of order.

Tasks of one partition can finish in any order (priority, batching, preemption), but a committed
offset means "everything before this is done". The tracker commits, per partition, the offset after the
longest run of finished tasks from the oldest one still tracked, so a crash repeats unfinished work and
never skips it.
"""

from __future__ import annotations

import heapq


class OffsetTracker:
    """Per partition, the offsets consumed and not yet done, and the offset that is safe to commit."""

    def __init__(self) -> None:
        self._pending: dict[tuple[str, int], list[int]] = {}  # heap of offsets not yet done
        self._done: dict[tuple[str, int], set[int]] = {}
        self._high: dict[tuple[str, int], int] = {}  # highest offset seen + 1

    def track(self, topic: str, partition: int, offset: int) -> None:
        """Track a consumed offset as not done (a redelivered offset already tracked is ignored)."""
        tp = (topic, partition)
        heap = self._pending.setdefault(tp, [])
        if offset in heap:  # tracked already (a redelivery while the first copy is in flight)
            return
        heapq.heappush(heap, offset)
        self._done.setdefault(tp, set())
        self._high[tp] = max(self._high.get(tp, 0), offset + 1)

    def done(self, topic: str, partition: int, offset: int) -> None:
        """Mark an offset done (ignored for a partition no longer tracked)."""
        tp = (topic, partition)
        if tp in self._done:
            self._done[tp].add(offset)

    def committable(self) -> dict[tuple[str, int], int]:
        """Per partition, the next offset to commit (only partitions whose committable offset moved)."""
        out = {}
        for tp, heap in self._pending.items():
            done = self._done[tp]
            moved = False
            while heap and heap[0] in done:
                done.discard(heapq.heappop(heap))
                moved = True
            if moved:
                out[tp] = heap[0] if heap else self._high[tp]
        return out

    def forget(self, topic: str, partition: int) -> None:
        """Drop a revoked partition: its unfinished tasks belong to another consumer now."""
        tp = (topic, partition)
        self._pending.pop(tp, None)
        self._done.pop(tp, None)
        self._high.pop(tp, None)

    def in_flight(self) -> int:
        """Offsets tracked and not yet committable, over all partitions."""
        return sum(len(h) for h in self._pending.values())
