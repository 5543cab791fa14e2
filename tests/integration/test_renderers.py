"""Renderers on the real broker, S3 and cancellations topic, with the synthetic backend.

Share mode (the default): two renderers of one share group share one partition's tasks; the class
priority holds under a LOW backlog; a renderer killed with -9 has its task redelivered to the other once
the lock expires; a graceful stop RELEASEs what it holds; a task on its last delivery is dead-lettered
with its original bytes and REJECTed; a render longer than the broker's default lock keeps its lock
(bootstrap sets the group's lock from the renderer settings). Classic mode: the key behaviours again
(every task answered once, priority under a LOW backlog).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import AcknowledgeType

from gpu_consumers.renderer import Renderer
from infra.bootstrap import ensure_buckets, ensure_share_groups, ensure_topics
from plumbing.kafka_clients import (
    OffsetReader,
    make_consumer,
    make_producer,
    make_share_consumer,
    renderer_group,
)
from plumbing.settings import ModelSpec, Settings
from plumbing.supervisor import free_port, probe_ready
from plumbing.topics import Stage, Topics
from producers.client import new_request, now_ms
from schemas.codec import default_codec
from schemas.records import DeadLetter, FramesRendered, Record, RenderTask, StatusEvent
from stream_processors.gatekeeper.fanout import plan_tasks
from tests.conftest import REPO, unique

POOL = "default"
RESULT_TIMEOUT_S = 90.0
READY_TIMEOUT_S = 60.0
codec = default_codec()


def renderer_settings(infra: Settings, mode: str, tmp_path: Path, **renderer: Any) -> Settings:
    """Fresh topics (one partition per render topic) and groups; a synthetic model served by POOL."""
    prefix = unique()
    settings = infra.model_copy(
        update={
            "home": tmp_path,
            "kafka": infra.kafka.model_copy(update={"topic_prefix": prefix, "render_partitions": 1}),
            "models": {"m": ModelSpec(path=tmp_path, backend="synthetic", max_batch=4)},
            "renderer": infra.renderer.model_copy(
                update={"consumer": mode, "synthetic_ms_per_frame": 200.0, "synthetic_steps": 4, **renderer}
            ),
        }
    )
    ensure_topics(settings)
    ensure_share_groups(settings)
    ensure_buckets(settings)
    return settings


def task(priority: str = "NORMAL", tenant: str = "t1", steps: int = 4) -> RenderTask:
    request = new_request(tenant_id=tenant, model="m", prompt=f"p {uuid.uuid4().hex[:6]}", width=16,
                          height=16, steps=steps, guidance_scale=7.5, output_format="PNG", seed=7,
                          priority=priority)  # fmt: skip
    [one] = plan_tasks(request, POOL, 4, now_ms(), now_ms())
    return one


def send(settings: Settings, *tasks: RenderTask) -> list[bytes]:
    """Produce each task in its own producer batch (acquisition follows batches); their bytes."""
    producer = make_producer(settings, "test", **{"linger.ms": 0})
    values = []
    for t in tasks:
        value = codec.write(t)
        producer.produce(Topics(settings).render(POOL, t.priority), value, t.request_id.encode())
        assert producer.flush(10) == 0
        values.append(value)
    return values


class Reader:
    """Follows topics from the beginning and keeps the decoded records, in order."""

    def __init__(self, settings: Settings, topics: list[str]) -> None:
        self.consumer = make_consumer(settings, f"test-{uuid.uuid4().hex}", "test")
        self.consumer.subscribe(topics)
        self.records: list[Record] = []

    def until(self, done: Callable[[list[Record]], bool], timeout_s: float = RESULT_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not done(self.records):
            assert time.monotonic() < deadline, f"timed out with {len(self.records)} records"
            self._read_one()

    def settle(self, idle_s: float) -> None:
        """Read on for ``idle_s`` more seconds (a stray extra record would be seen)."""
        deadline = time.monotonic() + idle_s
        while time.monotonic() < deadline:
            self._read_one()

    def _read_one(self) -> None:
        msg = self.consumer.poll(0.2)
        if msg is not None and msg.error() is None:
            self.records.append(codec.read_any(msg.value()))

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def frames_reader() -> Iterator[Callable[[Settings], Reader]]:
    made: list[Reader] = []

    def make(settings: Settings) -> Reader:
        t = Topics(settings)
        made.append(Reader(settings, [*t.all_frames(), t.dlq(Stage.RENDERER), t.status]))
        return made[-1]

    yield make
    for reader in made:
        reader.close()


def warm_up(settings: Settings, reader: Reader, workers: set[str]) -> None:
    """Send pairs of HIGH tasks until every one of ``workers`` has rendered one: a member new to a share
    group gets its assignment at its next heartbeat (``group.share.heartbeat.interval.ms``, 1 s here)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while {r.worker_id for r in frames(reader.records)} != workers:
        assert time.monotonic() < deadline, "not every renderer took a task"
        sent = len(frames(reader.records)) + 2
        send(settings, task("HIGH"), task("HIGH"))
        reader.until(lambda rs, n=sent: len(frames(rs)) >= n)  # type: ignore[misc]


class InThread:
    """A `Renderer` on a thread of this process."""

    def __init__(self, settings: Settings, worker: str) -> None:
        conf = settings.renderer.model_copy(update={"worker_id": worker})
        self.renderer = Renderer(settings.model_copy(update={"renderer": conf}), POOL)
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.renderer.run, args=(self.stop, self.ready), daemon=True)
        self.thread.start()
        assert self.ready.wait(READY_TIMEOUT_S)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(READY_TIMEOUT_S)
        assert not self.thread.is_alive()


@pytest.fixture
def renderers() -> Iterator[Callable[[Settings, str], InThread]]:
    made: list[InThread] = []

    def make(settings: Settings, worker: str) -> InThread:
        made.append(InThread(settings, worker))
        return made[-1]

    yield make
    for r in made:
        if r.thread.is_alive():
            r.close()


def frames(records: list[Record]) -> list[FramesRendered]:
    return [r for r in records if isinstance(r, FramesRendered)]


def running(records: list[Record], worker: str | None = None) -> bool:
    """True once a RUNNING status event (of ``worker``, when given) was read."""
    return any(
        isinstance(r, StatusEvent) and r.state == "RUNNING" and worker in (None, r.worker_id) for r in records
    )


def dead_letters(records: list[Record]) -> list[DeadLetter]:
    return [r for r in records if isinstance(r, DeadLetter)]


def rendered_by(records: list[Record]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in frames(records):
        out.setdefault(r.worker_id, []).append(r.task_id)
    return out


# -- share mode ---------------------------------------------------------------------------------------
def test_two_renderers_share_one_partition(
    infra: Settings, tmp_path: Path, renderers: Any, frames_reader: Any
) -> None:
    """One partition, two share-group members: both render, at the same time, each task exactly once."""
    settings = renderer_settings(infra, "share", tmp_path, synthetic_ms_per_frame=400.0)
    reader = frames_reader(settings)
    renderers(settings, "a")
    renderers(settings, "b")
    warm_up(settings, reader, {"a", "b"})
    tasks = [task("HIGH") for _ in range(8)]
    send(settings, *tasks)
    reader.until(lambda rs: len(frames(rs)) >= len(tasks))
    reader.settle(2.0)
    ids = {t.task_id for t in tasks}
    reader.records = [r for r in reader.records if getattr(r, "task_id", None) in ids]
    done = frames(reader.records)
    assert sorted(r.task_id for r in done) == sorted(ids)
    assert {r.outcome for r in done} == {"RENDERED"}
    by = rendered_by(reader.records)
    assert set(by) == {"a", "b"}, by
    # No renderer idled while a task waited: renders of the two workers overlapped in time.
    spans = {w: [(r.started_at, r.finished_at) for r in done if r.worker_id == w] for w in by}
    overlap = sum(max(0, min(e1, e2) - max(s1, s2)) for s1, e1 in spans["a"] for s2, e2 in spans["b"])
    assert overlap > 0.5 * sum(e - s for s, e in spans["a"]), spans
    # Backlog readers (the gatekeeper's shedding) see the queue drained, as with a consumer group.
    reader = OffsetReader(settings)
    high = Topics(settings).render(POOL, "HIGH")
    deadline = time.monotonic() + 10.0
    while True:
        [(committed, end)] = reader.group_offsets(
            renderer_group(settings, POOL, share=False), [high]
        ).values()
        if committed == end:
            break
        assert time.monotonic() < deadline, (committed, end)
        time.sleep(0.2)


@pytest.mark.parametrize("mode", ["share", "classic"])
def test_high_first_under_low_backlog(
    infra: Settings, tmp_path: Path, renderers: Any, frames_reader: Any, mode: str
) -> None:
    """With a LOW backlog in Kafka, a HIGH task is rendered next, preempting the LOW batch in hand between
    two steps; LOW is micro-batched and its tenants take turns."""
    settings = renderer_settings(infra, mode, tmp_path, synthetic_ms_per_frame=600.0, progress_interval_s=0.1)
    reader = frames_reader(settings)
    lows = [task("LOW", tenant=f"t{i % 3}") for i in range(16)]
    send(settings, *lows)
    renderers(settings, "a")
    reader.until(running)  # a LOW batch is rendering
    [high] = [task("HIGH")]
    send(settings, high)
    reader.until(lambda rs: len(frames(rs)) >= 17)
    order = [r.task_id for r in frames(reader.records)]
    assert sorted(order) == sorted(t.task_id for t in [*lows, high])
    # At most one LOW batch (4 tasks) finishes before HIGH, and at most one more is suspended under it:
    # the other LOW tasks (Kafka's backlog, or buffered) start only after HIGH is done.
    assert order.index(high.task_id) <= 4, order
    high_done = next(r for r in frames(reader.records) if r.task_id == high.task_id)
    lows_done = [r for r in frames(reader.records) if r.priority == "LOW"]
    assert sum(r.started_at > high_done.finished_at for r in lows_done) >= 8
    # Step-level preemption: HIGH rendered nested inside the LOW batch it found running.
    assert any(
        r.started_at < high_done.started_at and r.finished_at > high_done.finished_at for r in lows_done
    ), (high_done, lows_done[:4])
    # Micro-batching: LOW tasks were rendered in batches of up to max_batch (4) frames.
    assert max(r.batch_size for r in lows_done) == 4
    # Tenant turns inside LOW: the first four LOW tasks rendered come from three tenants.
    assert len({r.tenant_id for r in lows_done[:4]}) == 3


def test_kill_9_redelivers_to_the_other(infra: Settings, tmp_path: Path, frames_reader: Any) -> None:
    """A renderer killed mid-render never acknowledges: its task comes back to the other member."""
    slow = {"share_lock_ms": 15_000, "synthetic_ms_per_frame": 4000.0, "progress_interval_s": 0.2}
    settings = renderer_settings(infra, "share", tmp_path, **slow)
    reader = frames_reader(settings)
    victim = spawn(settings, "victim")
    try:
        wait_ready(victim, settings, "victim")
        [t] = [task()]
        send(settings, t)
        reader.until(lambda rs: running(rs, "victim"))
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        survivor = spawn(settings, "survivor")
        try:
            wait_ready(survivor, settings, "survivor")
            reader.until(lambda rs: len(frames(rs)) >= 1, timeout_s=15 + 4 + READY_TIMEOUT_S)
            reader.settle(2.0)
        finally:
            survivor.send_signal(signal.SIGTERM)
            survivor.wait(60)
    finally:
        if victim.poll() is None:
            victim.kill()
    [done] = frames(reader.records)
    assert (done.task_id, done.worker_id, done.outcome) == (t.task_id, "survivor", "RENDERED")


def test_graceful_stop_releases(infra: Settings, tmp_path: Path, renderers: Any, frames_reader: Any) -> None:
    """A renderer stopped with tasks in hand hands them back (RELEASE, then leaving the group, which
    releases too): another renders them well before the lock (60 s) or the session (45 s) would expire."""
    slow = {"synthetic_ms_per_frame": 3000.0, "shutdown_grace_s": 0.0, "progress_interval_s": 0.2}
    settings = renderer_settings(infra, "share", tmp_path, share_lock_ms=60_000, **slow)
    reader = frames_reader(settings)
    first = renderers(settings, "first")
    tasks = [task("LOW") for _ in range(3)]
    send(settings, *tasks)
    reader.until(running)
    stopped_at = time.monotonic()
    first.close()  # grace 0: the batch is abandoned between two steps and released
    renderers(settings, "second")
    reader.until(lambda rs: len(frames(rs)) >= 3, timeout_s=40.0)
    assert time.monotonic() - stopped_at < 40.0
    assert sorted(r.task_id for r in frames(reader.records)) == sorted(t.task_id for t in tasks)
    assert {r.worker_id for r in frames(reader.records)} == {"second"}


def test_last_delivery_is_dead_lettered(
    infra: Settings, tmp_path: Path, renderers: Any, frames_reader: Any
) -> None:
    """A task delivered as often as the group allows goes to the renderer DLQ with its bytes, then is
    REJECTed (never delivered again)."""
    settings = renderer_settings(infra, "share", tmp_path, share_delivery_limit=2)
    reader = frames_reader(settings)
    [t] = [task()]
    [value] = send(settings, t)
    # Delivery 1 goes to a member that gives it back (as a crashed renderer would, sooner).
    group = renderer_group(settings, POOL)
    other = make_share_consumer(settings, group, "test")
    other.subscribe([Topics(settings).render(POOL, "NORMAL")])
    deadline = time.monotonic() + READY_TIMEOUT_S
    taken: list[Any] = []
    while not taken:
        assert time.monotonic() < deadline
        taken = [m for m in other.poll(0.5) if m.error() is None]
    assert taken[0].delivery_count() == 1
    other.acknowledge(taken[0], AcknowledgeType.RELEASE)
    other.close()
    renderers(settings, "a")
    reader.until(lambda rs: bool(dead_letters(rs)))
    reader.settle(3.0)
    assert frames(reader.records) == []
    [dead] = dead_letters(reader.records)
    assert (dead.stage, dead.value, dead.error_code) == (Stage.RENDERER.value, value, "DELIVERY_LIMIT")
    # REJECTed: a fresh member of the group is never given it again.
    again = make_share_consumer(settings, group, "test")
    again.subscribe([Topics(settings).render(POOL, "NORMAL")])
    try:
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            assert [m for m in again.poll(0.5) if m.error() is None] == []
    finally:
        again.close()


def test_render_longer_than_default_lock_keeps_it(
    infra: Settings, tmp_path: Path, renderers: Any, frames_reader: Any
) -> None:
    """A 34 s render outlives the broker's default lock (30 s); bootstrap set the group's lock from the
    renderer settings (45 s), so the idle second member never gets the task and it is rendered once."""
    settings = renderer_settings(
        infra, "share", tmp_path, share_lock_ms=45_000, synthetic_ms_per_frame=34_000.0
    )
    reader = frames_reader(settings)
    first = renderers(settings, "first")
    [t] = [task()]
    send(settings, t)
    reader.until(running)
    renderers(settings, "second")
    reader.until(lambda rs: len(frames(rs)) >= 1, timeout_s=60.0)
    reader.settle(3.0)
    [done] = frames(reader.records)
    assert (done.worker_id, done.outcome) == ("first", "RENDERED")
    assert first.renderer.intake.refused == 0  # type: ignore[attr-defined]


# -- subprocess renderers ---------------------------------------------------------------------------
PORTS: dict[str, int] = {}  # worker -> its /readyz port


def spawn(settings: Settings, worker: str) -> subprocess.Popen[bytes]:
    PORTS[worker] = free_port()
    env = {**os.environ, **settings.to_env(), "AIGC_RENDERER__WORKER_ID": worker,
           "AIGC_METRICS_PORT": str(PORTS[worker])}  # fmt: skip
    log = (settings.home / f"{worker}.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "aigc", "render", "--pool", POOL], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip


def wait_ready(proc: subprocess.Popen[bytes], settings: Settings, worker: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not probe_ready(PORTS[worker])[0]:
        assert proc.poll() is None, "the renderer exited"
        assert time.monotonic() < deadline, "the renderer did not start"
        time.sleep(0.2)
