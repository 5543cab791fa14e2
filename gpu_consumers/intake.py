"""Where render tasks come from and where their acknowledgements go: one small interface, two modes.

The renderer asks its `Intake` for messages (``poll``), says when a task's outcome is safely in Kafka
(``finish``, with `Ack.ACCEPT` for an answered or retried task, `Ack.REJECT` for a dead-lettered one),
asks whether a task is still its own (``owns``) and hands everything back at the end (``close``).
``tick`` runs once per loop turn for periodic work (commits).

`ShareIntake` (setting ``renderer.consumer=share``, the default): the pool's renderers are members of
one share group (KIP-932) and take the render topics as queues: any idle renderer takes the next task
whatever partition it sits in. One `ShareConsumer` per class topic, each taking at most one poll's worth
of records (``max.poll.records``: 1 for HIGH, a micro-batch for the others) and polling again only once
every record of its last poll is acknowledged (explicit acknowledgement requires it), so a renderer
holds at most about one batch per class and the rest of the backlog stays in Kafka for the others; the
scheduler chooses among what the three hold. Delivery: a task is acknowledged ACCEPT (or REJECT after
its dead letter) only once the records it caused are acknowledged by the broker; a crashed renderer's
tasks come back when their lock expires (``share.record.lock.duration.ms``, set by bootstrap longer than
the longest render: the client cannot renew a lock); a graceful stop RELEASEs what it holds. The broker
counts deliveries and archives a task after ``share.delivery.count.limit`` of them, so a task on its
last delivery is dead-lettered with its original bytes (``exhausted``) before it is REJECTed.

`ClassicIntake` (``renderer.consumer=classic``, brokers without share groups): a consumer group whose
partitions are split between renderers (``range``, so every renderer sees every class); a class's
partitions pause while about one batch of it is buffered. A task's offset is committed only once its
outcome is acknowledged and every earlier offset of its partition is done (`OffsetTracker`), about once a
second: a crash repeats unfinished tasks and never skips one.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import time
from collections.abc import Callable, Collection
from typing import Any, Protocol

from confluent_kafka import AcknowledgeType, KafkaException, Message, TopicPartition

from gpu_consumers.offsets import OffsetTracker
from gpu_consumers.scheduler import CLASSES
from plumbing.errors import classify, is_fatal
from plumbing.kafka_clients import (
    consume_available,
    make_consumer,
    make_share_consumer,
    renderer_group,
)
from plumbing.settings import Settings

log = logging.getLogger(__name__)
COMMIT_INTERVAL_S = 1.0  # classic mode: a crash repeats at most about a second of work
STATISTICS_INTERVAL_MS = 1000

Coords = tuple[str, int, int]  # topic, partition, offset of one task


class Ack(enum.Enum):
    """How a finished task is acknowledged: ACCEPT once answered, REJECT once dead-lettered."""

    ACCEPT = AcknowledgeType.ACCEPT
    REJECT = AcknowledgeType.REJECT


def coords(msg: Message) -> Coords:
    """The (topic, partition, offset) of a consumed message."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError("not a consumed message: it has no topic, partition or offset")
    return topic, partition, offset


class Intake(Protocol):
    """The renderer's source of tasks (all calls on the renderer's main thread)."""

    def start(self) -> None:
        """Join the group and start fetching."""

    def assigned(self) -> bool:
        """True once the group has given this member partitions to take tasks from."""

    def poll(self, room: Collection[str], timeout_s: float) -> list[Message]:
        """Messages of the classes in ``room`` (those the scheduler has room for), waiting at most
        ``timeout_s`` for the first."""

    def exhausted(self, msg: Message) -> bool:
        """True when this is the task's last delivery: dead-letter it instead of rendering it."""

    def finish(self, task: Coords, ack: Ack) -> None:
        """The task's outcome is acknowledged by Kafka: it may be acknowledged (or committed) now."""

    def owns(self, task: Coords) -> bool:
        """True while the task is still this renderer's to finish."""

    def tick(self) -> None:
        """Periodic work of the loop (send acknowledgements, commit offsets)."""

    def close(self) -> None:
        """Hand back what is not finished (RELEASE, or leave uncommitted) and leave the group."""


class ShareIntake:
    """One share-group member per class topic; see the module docstring."""

    def __init__(self, settings: Settings, pool: str, topics: dict[str, str], batch_tasks: int) -> None:
        conf = settings.renderer
        group = renderer_group(settings, pool)
        self.topics = topics
        self.class_of = {topic: cls for cls, topic in topics.items()}
        self.limit = conf.share_delivery_limit
        self.consumers = {
            cls: make_share_consumer(
                settings,
                group,
                f"renderer.{pool}.{cls.lower()}",
                **{
                    # Tasks per poll: HIGH never waits to fill a batch, the others take a micro-batch.
                    # (The broker hands out whole record batches: tasks produced together in one batch
                    # go to one member whatever this says.)
                    "max.poll.records": 1 if cls == "HIGH" else batch_tasks,
                    "fetch.wait.max.ms": conf.share_fetch_wait_ms.get(cls, 10),
                    # A consumer holding a batch is not polled until the batch is acknowledged: let
                    # the lock, not the poll interval, bound how long a render may hold its tasks.
                    "max.poll.interval.ms": max(conf.max_poll_interval_ms, 2 * conf.share_lock_ms),
                    # Statistics say when the member has its assignment (`assigned`): a new member gets
                    # it only at its next heartbeat (group.share.heartbeat.interval.ms: 5 s by default,
                    # 1 s on the brokers infra/services.py and docker-compose.yml configure).
                    "statistics.interval.ms": STATISTICS_INTERVAL_MS,
                    "stats_cb": functools.partial(self._statistics, cls),
                },
            )
            for cls in topics
        }
        for consumer in self.consumers.values():
            consumer.set_acknowledgement_commit_callback(self._committed)
        # A share group has no committed offsets to read a backlog from: commit, under the consumer
        # group's name (no member joins it), the offset after the last task taken from each partition,
        # so end offset minus committed is the number of tasks not yet taken, as in classic mode. Once a
        # second: one OffsetFetch, and a commit only where this renderer is ahead.
        self.progress = make_consumer(
            settings.model_copy(update={"instance": None}),  # no static member: it never joins the group
            renderer_group(settings, pool, share=False),
            f"renderer.{pool}.progress",
        )
        self.taken: dict[tuple[str, int], int] = {}
        self.last_progress = 0.0
        self.held: dict[str, set[Coords]] = {cls: set() for cls in topics}
        self.assignment = dict.fromkeys(topics, 0)  # partitions per class, from the statistics
        self.unsent: set[str] = set()  # classes with acknowledgements not yet sent to the broker
        self.refused = 0  # acknowledgements the broker refused (a lock that expired first)

    def start(self) -> None:
        """Subscribe each class's share consumer to its render topic."""
        for cls, consumer in self.consumers.items():
            consumer.subscribe([self.topics[cls]])

    def assigned(self) -> bool:
        """True once every class's consumer has partitions (the statistics say so)."""
        return all(self.assignment.values())

    def _statistics(self, cls: str, stats: str) -> None:
        self.assignment[cls] = int(json.loads(stats).get("cgrp", {}).get("assignment_size", 0))

    def poll(self, room: Collection[str], timeout_s: float) -> list[Message]:
        """Records of the classes in ``room`` whose consumer holds nothing unacknowledged; when no class
        may poll, an empty list after ``timeout_s``."""
        # A consumer may poll only once its last poll is all acknowledged: that is the bound on prefetch.
        free = [cls for cls in CLASSES if cls in self.consumers and cls in room and not self.held[cls]]
        if not free:
            time.sleep(timeout_s)
            return []
        out: list[Message] = []
        for i, cls in enumerate(free):
            # The most urgent free class blocks (it returns as soon as a record comes); the rest are
            # only checked, their records fetched in the background meanwhile.
            for msg in self.consumers[cls].poll(timeout_s if i == 0 else 0):
                error = msg.error()
                if error is not None:
                    if is_fatal(error):
                        raise KafkaException(error)
                    log.warning("share consumer error: %s", error)
                    continue
                topic, partition, offset = coords(msg)
                self.held[cls].add((topic, partition, offset))
                self.taken[(topic, partition)] = max(self.taken.get((topic, partition), 0), offset + 1)
                out.append(msg)
        return out

    def exhausted(self, msg: Message) -> bool:
        """True when the broker's delivery count reached ``share.delivery.count.limit``."""
        count = msg.delivery_count()
        return count is not None and count >= self.limit

    def finish(self, task: Coords, ack: Ack) -> None:
        """Acknowledge the task (ACCEPT or REJECT); the acknowledgement goes out at the next ``tick``."""
        self._acknowledge(task, ack.value)

    def owns(self, task: Coords) -> bool:
        """True while the task's record is held (delivered to this member and not yet acknowledged)."""
        return task in self.held[self.class_of[task[0]]]

    def tick(self) -> None:
        """Send pending acknowledgements, and commit progress about once a second."""
        for cls in self.unsent:
            try:
                self.consumers[cls].commit_async()
            except KafkaException as exc:
                if classify(exc) is None:
                    raise
                log.warning("sending acknowledgements failed (%s); they go with the next poll", exc)
        self.unsent.clear()
        if self.taken and time.monotonic() - self.last_progress >= COMMIT_INTERVAL_S:
            self._commit_progress()
            self.last_progress = time.monotonic()

    def _commit_progress(self) -> None:
        """Commit this renderer's progress where it is ahead of what the group holds: each renderer knows
        only what it took, so the committed offset converges on the furthest any renderer took."""
        partitions = [TopicPartition(t, p) for t, p in self.taken]
        try:
            committed = {
                (tp.topic, tp.partition): tp.offset for tp in self.progress.committed(partitions, 10)
            }
            ahead = [TopicPartition(t, p, o) for (t, p), o in self.taken.items() if o > committed[(t, p)]]
            if ahead:
                self.progress.commit(offsets=ahead, asynchronous=False)
        except KafkaException as exc:  # informational: the next turn tries again
            log.warning("committing progress failed (%s)", exc)

    def close(self) -> None:
        """RELEASE every task still held (buffered, or abandoned at shutdown) and leave the group."""
        for cls, held in self.held.items():
            if held:
                log.info("releasing %d %s task(s)", len(held), cls)
            for task in sorted(held):
                self._acknowledge(task, AcknowledgeType.RELEASE)
        for consumer in self.consumers.values():
            consumer.close()
        if self.taken:
            self._commit_progress()
        self.progress.close()

    def _acknowledge(self, task: Coords, ack_type: AcknowledgeType) -> None:
        cls = self.class_of[task[0]]
        if task not in self.held[cls]:
            return  # acknowledged already (a task routed twice), or not ours
        self.held[cls].discard(task)
        try:
            self.consumers[cls].acknowledge_offset(*task, ack_type)
        except Exception as exc:  # noqa: BLE001 - an expired lock: the broker hands the task out again
            self.refused += 1
            log.warning("could not acknowledge %s:%s:%s (%s): it will be delivered again", *task, exc)
            return
        self.unsent.add(cls)

    def _committed(self, offsets: dict[TopicPartition, set[int]], error: Any) -> None:
        if error is not None:
            self.refused += sum(len(o) for o in offsets.values())
            log.warning("the broker refused acknowledgements of %s: %s", offsets, error)


class ClassicIntake:
    """A consumer-group member with committed offsets; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        pool: str,
        topics: dict[str, str],
        batch_tasks: int,
        on_revoked: Callable[[str, int], None],
    ) -> None:
        self.topics = topics
        self.batch_tasks = batch_tasks
        self.on_revoked = on_revoked
        self.consumer = make_consumer(
            settings,
            renderer_group(settings, pool),
            f"renderer.{pool}",
            # range splits each priority topic across the group: every renderer sees every class (sticky
            # assignors balance partition counts over all topics, leaving a class on one member).
            **{
                "max.poll.interval.ms": settings.renderer.max_poll_interval_ms,
                "partition.assignment.strategy": "range",
            },
        )
        self.tracker = OffsetTracker()
        self.partitions: set[tuple[str, int]] = set()
        self.paused: set[str] = set()
        self.last_commit = 0.0

    def start(self) -> None:
        """Subscribe to the render topics, with the rebalance callbacks."""
        self.consumer.subscribe(
            list(self.topics.values()),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )

    def assigned(self) -> bool:
        """Always True: a consumer group assigns partitions when the member joins."""
        return True  # a consumer group assigns on join (no initial rebalance delay on our brokers)

    def poll(self, room: Collection[str], timeout_s: float) -> list[Message]:
        """What is fetched of partitions not paused (a full class is paused first); each is tracked."""
        self._pause_full(room)
        messages = consume_available(self.consumer, self.batch_tasks, timeout_s)
        for msg in messages:
            if msg.error() is None:
                self.tracker.track(*coords(msg))
            else:
                log.warning("consumer error: %s", msg.error())
        return [msg for msg in messages if msg.error() is None]

    def exhausted(self, msg: Message) -> bool:
        """Always False: a consumer group counts no deliveries."""
        return False  # a consumer group counts no deliveries

    def finish(self, task: Coords, ack: Ack) -> None:
        """Mark the task's offset done; it is committed once every earlier offset is done too."""
        self.tracker.done(*task)

    def owns(self, task: Coords) -> bool:
        """True while the task's partition is assigned to this member."""
        return (task[0], task[1]) in self.partitions

    def tick(self) -> None:
        """Commit what is committable, about once a second."""
        if time.monotonic() - self.last_commit >= COMMIT_INTERVAL_S:
            self._commit()
            self.last_commit = time.monotonic()

    def close(self) -> None:
        """Commit what is done; the rest stays uncommitted and goes to another member."""
        self._commit(asynchronous=False)
        self.consumer.close()

    def _pause_full(self, room: Collection[str]) -> None:
        """Pause a class's partitions while it has no room (about one batch buffered); resume after."""
        for cls, topic in self.topics.items():
            partitions = [TopicPartition(t, p) for t, p in self.partitions if t == topic]
            if cls not in room and topic not in self.paused and partitions:
                self.consumer.pause(partitions)
                self.paused.add(topic)
            elif cls in room and topic in self.paused:
                self.consumer.resume(partitions)
                self.paused.discard(topic)

    def _commit(self, asynchronous: bool = True) -> None:
        offsets = [
            TopicPartition(t, p, o)
            for (t, p), o in self.tracker.committable().items()
            if (t, p) in self.partitions
        ]
        if offsets:
            try:
                if asynchronous:
                    self.consumer.commit(offsets=offsets, asynchronous=True)
                else:
                    self.consumer.commit(offsets=offsets, asynchronous=False)
            except Exception as exc:
                if classify(exc) is None:
                    raise
                log.warning("commit failed (%s); it will be retried", exc)

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.partitions |= {(tp.topic, tp.partition) for tp in partitions}
        paused = [tp for tp in partitions if tp.topic in self.paused]
        if paused:
            consumer.pause(paused)

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self._commit(asynchronous=False)
        # librdkafka keeps a partition paused across its revocation: resume it, or one assigned back
        # after its topic was resumed would never be fetched again (`_on_assign` pauses it anew if due).
        consumer.resume(partitions)
        for tp in partitions:
            self.on_revoked(tp.topic, tp.partition)
            self.tracker.forget(tp.topic, tp.partition)
            self.partitions.discard((tp.topic, tp.partition))


def make_intake(
    settings: Settings,
    pool: str,
    topics: dict[str, str],
    batch_tasks: int,
    on_revoked: Callable[[str, int], None],
) -> Intake:
    """The intake of the mode in ``renderer.consumer``."""
    if settings.renderer.consumer == "share":
        return ShareIntake(settings, pool, topics, batch_tasks)
    return ClassicIntake(settings, pool, topics, batch_tasks, on_revoked)
