"""Which buffered render tasks run next: priority with bounded starvation, tenant fairness, micro-batches.

Pure logic over the tasks the renderer has prefetched; no Kafka, no torch.

Between classes (HIGH, NORMAL, LOW) it is weighted fair sharing by stride scheduling: each class has a
weight; serving ``n`` frames of a class advances its *pass* by ``n / weight``; the class with work and
the lowest pass goes next, ties going to the higher priority. A class that had no work re-enters at the
virtual time (the pass of the last batch picked), so idleness earns no credit. With weights 16:4:1 a
saturated HIGH
class still leaves NORMAL ~19% and LOW ~5% of frames (the guaranteed minimum share), while a lightly
loaded HIGH class always has the lowest pass and goes first. On top of that, *aging*: a task that has
waited longer than ``aging_s`` is served next whatever the passes say, first in its batch.

Preemption asks the same question: a running batch is suspended (between two denoising steps) while
a waiting class of higher priority would be picked before the running class, whose pass already
includes the running batch. A lightly loaded HIGH class re-enters at the virtual time and preempts at
once. A saturated one preempts only until its pass catches up with the suspended batch's class, which
then resumes: a LOW batch of ``n`` frames waits at most ``n * w_HIGH / w_LOW`` HIGH frames plus one HIGH
batch (ties go to the higher class), and the share between classes is what the weights say. A batch
picked by aging is not preempted at all: it has waited long enough.

Inside a class, tasks are taken round-robin across tenants (each tenant keeps its own FIFO), so a
tenant flooding a class gets one turn per round like every other tenant with work in the lookahead.

A batch holds tasks of one class with the same `BatchKey` (model, size, steps, guidance, scheduler),
up to ``max_frames`` frames. HIGH never waits to fill a batch; other classes wait at most
``batch_wait_s`` for more compatible tasks.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gpu_consumers.tasks import PRIORITY_RANK, BatchKey, Task

CLASSES = ("HIGH", "NORMAL", "LOW")


class ClassQueue:
    """One class's tasks: a FIFO per tenant, visited round-robin."""

    def __init__(self) -> None:
        self.tenants: collections.OrderedDict[str, collections.deque[Task]] = collections.OrderedDict()
        self.frames = 0
        self.tasks = 0

    def add(self, task: Task) -> None:
        """Append ``task`` to its tenant's FIFO."""
        self.tenants.setdefault(task.tenant_id, collections.deque()).append(task)
        self.frames += task.frame_count
        self.tasks += 1

    def oldest(self) -> Task | None:
        """The longest-waiting task at the head of a tenant's FIFO, or None when the class is empty."""
        heads = [q[0] for q in self.tenants.values() if q]
        return min(heads, key=lambda t: t.received_at) if heads else None

    def take(self, key: BatchKey | None, max_frames: int, first_tenant: str | None = None) -> list[Task]:
        """Up to ``max_frames`` frames of tasks compatible with ``key`` (the first task's key when None),
        one task per tenant per round, starting with ``first_tenant`` when given."""
        taken: list[Task] = []
        frames = 0
        progress = True
        if first_tenant is not None and first_tenant in self.tenants:
            self.tenants.move_to_end(first_tenant, last=False)
        while progress and frames < max_frames:
            progress = False
            for tenant in list(self.tenants):
                queue = self.tenants[tenant]
                task = next((t for t in queue if key is None or t.key == key), None)
                if task is None or (taken and frames + task.frame_count > max_frames):
                    continue
                queue.remove(task)
                # This tenant had its turn: move it to the back of the round.
                self.tenants.move_to_end(tenant)
                if not queue:
                    del self.tenants[tenant]
                key = task.key
                taken.append(task)
                frames += task.frame_count
                self.frames -= task.frame_count
                self.tasks -= 1
                progress = True
                if frames >= max_frames:
                    break
        return taken

    def compatible_frames(self, key: BatchKey) -> int:
        """Frames buffered in tasks whose batch key is ``key``."""
        return sum(t.frame_count for q in self.tenants.values() for t in q if t.key == key)

    def remove_partition(self, topic: str, partition: int) -> list[Task]:
        """Drop (and return) the tasks consumed from ``topic``'s ``partition``."""
        removed = []
        for tenant in list(self.tenants):
            queue = self.tenants[tenant]
            keep = collections.deque(t for t in queue if (t.topic, t.partition) != (topic, partition))
            removed += [t for t in queue if (t.topic, t.partition) == (topic, partition)]
            if keep:
                self.tenants[tenant] = keep
            else:
                del self.tenants[tenant]
        self.frames -= sum(t.frame_count for t in removed)
        self.tasks -= len(removed)
        return removed


@dataclass(frozen=True)
class Pick:
    """A micro-batch chosen to run, with the class pass it was chosen at (for preemption)."""

    tasks: list[Task]
    cls: str
    pass_at_pick: float
    aged: bool = False  # picked because its oldest task waited past aging_s: not preempted

    @property
    def frames(self) -> int:
        """Frames in the batch, all tasks together."""
        return sum(t.frame_count for t in self.tasks)


class Scheduler:
    """The renderer's buffered tasks by class, and the decisions over them; see the module docstring."""

    def __init__(
        self,
        weights: Mapping[str, float],
        aging_s: float,
        batch_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.weights = {c: float(weights[c]) for c in CLASSES}
        self.aging_s = aging_s
        self.batch_wait_s = batch_wait_s
        self.clock = clock
        self.queues = {c: ClassQueue() for c in CLASSES}
        self.passes = dict.fromkeys(CLASSES, 0.0)
        self.virtual = 0.0  # pass of the last batch picked

    # -- state ------------------------------------------------------------------------------------
    def add(self, task: Task) -> None:
        """Buffer ``task`` in its class; a class that was empty re-enters at the virtual time."""
        queue = self.queues[task.priority]
        if queue.tasks == 0:  # re-enter at the virtual time: idle time earns no credit
            self.passes[task.priority] = max(self.passes[task.priority], self.virtual)
        queue.add(task)

    def buffered_frames(self, cls: str) -> int:
        """Frames buffered in class ``cls``."""
        return self.queues[cls].frames

    def buffered_tasks(self) -> int:
        """Tasks buffered in every class together."""
        return sum(q.tasks for q in self.queues.values())

    def charge(self, cls: str, frames: int) -> None:
        """Advance ``cls``'s pass for ``frames`` frames served."""
        self.passes[cls] += frames / self.weights[cls]

    def remove_partition(self, topic: str, partition: int) -> list[Task]:
        """Drop (and return) every buffered task consumed from ``topic``'s ``partition``."""
        return [t for q in self.queues.values() for t in q.remove_partition(topic, partition)]

    # -- decisions --------------------------------------------------------------------------------
    def next_class(self, above: str | None = None) -> str | None:
        """The class to serve next (only classes more urgent than ``above``, if given), or None."""
        chosen = self._choose(above)
        return chosen[0] if chosen else None

    def _choose(self, above: str | None) -> tuple[str, bool] | None:
        """(class, chosen by aging) of the next batch, or None."""
        allowed = CLASSES if above is None else CLASSES[: PRIORITY_RANK[above]]
        heads = {c: self.queues[c].oldest() for c in allowed if self.queues[c].tasks}
        if not heads:
            return None
        now = self.clock()
        aged = [c for c, head in heads.items() if head and now - head.received_at >= self.aging_s]
        if aged:
            return min(aged, key=lambda c: heads[c].received_at), True  # type: ignore[union-attr]
        return min(heads, key=lambda c: (self.passes[c], PRIORITY_RANK[c])), False

    def pick(self, max_frames: int, above: str | None = None) -> Pick | None:
        """The next micro-batch, or None when nothing should start yet (empty, or waiting to fill).

        ``above`` restricts the pick to classes more urgent than it (a preempting pick, which never waits).
        """
        chosen = self._choose(above)
        if chosen is None:
            return None
        cls, aged = chosen
        queue = self.queues[cls]
        head = queue.oldest()
        assert head is not None
        if (
            above is None
            and cls != "HIGH"
            and queue.compatible_frames(head.key) < max_frames
            and (self.clock() - head.received_at < self.batch_wait_s)
        ):
            return None  # a moment more may fill the batch; HIGH never waits
        tasks = queue.take(head.key, max_frames, first_tenant=head.tenant_id if aged else None)
        pick = Pick(tasks, cls, self.passes[cls], aged)
        self.virtual = max(self.virtual, pick.pass_at_pick)
        self.charge(cls, pick.frames)
        return pick

    def wait_hint(self) -> float | None:
        """Seconds until a waiting partial batch should start anyway (for the poll timeout)."""
        cls = self.next_class()
        if cls is None:
            return None
        head = self.queues[cls].oldest()
        assert head is not None
        return max(0.0, self.batch_wait_s - (self.clock() - head.received_at))

    def should_preempt(self, running: Pick) -> bool:
        """True when a more urgent class waits that fair sharing serves before ``running``'s class."""
        if running.aged:
            return False
        for cls in CLASSES[: PRIORITY_RANK[running.cls]]:
            if self.queues[cls].tasks and self.passes[cls] <= self.passes[running.cls]:
                return True
        return False
