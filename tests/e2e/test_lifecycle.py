"""Lifecycle on the real stack: cancellation mid-render, deadlines in the queue, state across a restart,
renders that outlast the consumer's poll interval, and `infra.pipeline.running_pipeline` itself (its
isolated run leaves no process, topic or keyspace behind).

One synthetic renderer renders 12 s per frame in 24 steps (0.5 s a step) with max.poll.interval.ms at
10 s, so every render here outlasts the poll interval, and cancellation is honoured between steps.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.pipeline import READY_TIMEOUT_S, running_pipeline
from plumbing.kafka_clients import make_admin
from plumbing.metadata import connect
from plumbing.settings import ModelSpec, Settings, Tier
from plumbing.supervisor import Supervisor
from plumbing.topics import Topics
from producers.client import Client, now_ms
from tests.e2e.conftest import collect, completions_of

SERVICE_MS = 12_000.0
STEPS = 24
DELETE_TIMEOUT_S = 30.0  # the broker deletes topics asynchronously; its metadata follows shortly after


@pytest.fixture(scope="module")
def slow(infra: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Supervisor]]:
    settings = infra.model_copy(
        update={
            "home": tmp_path_factory.mktemp("lifecycle"),
            "models": {"synth": ModelSpec(path=Path("/synthetic"), backend="synthetic", max_batch=1)},
            "gatekeeper": infra.gatekeeper.model_copy(
                update={
                    "tiers": {"standard": Tier(), "one": Tier(requests_per_s=0.001, request_burst=1)},
                    "tenant_tiers": {"one-at-a-time": "one"},
                    "shed_backlog": {"LOW": 3},
                }
            ),
            "renderer": infra.renderer.model_copy(
                update={"max_poll_interval_ms": 10_000, "progress_interval_s": 0.5}
            ),
        }
    )
    with running_pipeline(settings, synthetic_ms=SERVICE_MS, isolate="life", drop=True) as pipe:
        run = pipe.settings
        assert (
            run.kafka.topic_prefix.startswith("life") and run.kafka.topic_prefix != infra.kafka.topic_prefix
        )
        assert run.cassandra.keyspace != infra.cassandra.keyspace
        assert sorted(pipe.supervisor.alive()) == sorted(s.name for s in pipe.supervisor.stages)
        yield run, pipe.supervisor
        assert run_topics(run) and keyspace_exists(run)
        pids = [child.proc.pid for child in pipe.supervisor.children.values()]
    # `running_pipeline` leaves nothing behind: no stage process, and (drop=True) no topic or keyspace.
    assert pipe.supervisor.alive() == []
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]  # exited and reaped
    deadline = time.monotonic() + DELETE_TIMEOUT_S
    while (left := run_topics(run)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == []
    assert not keyspace_exists(run)
    assert (settings.home / "logs" / run.kafka.topic_prefix / "gatekeeper.log").exists()


def run_topics(settings: Settings) -> list[str]:
    names = make_admin(settings).list_topics(timeout=30).topics
    owned = (f"{settings.kafka.topic_prefix}.", f"{settings.gatekeeper.app_id}-")
    return [name for name in names if name.startswith(owned)]


def keyspace_exists(settings: Settings) -> bool:
    cluster, session = connect(settings.cassandra)
    try:
        rows = session.execute(
            "SELECT keyspace_name FROM system_schema.keyspaces WHERE keyspace_name = %s",
            (settings.cassandra.keyspace,),
        )
        return bool(list(rows))
    finally:
        cluster.shutdown()


def image(**extra):
    return {
        "tenant_id": "life",
        "prompt": "a slow lantern",
        "model": "synth",
        "width": 64,
        "height": 64,
        "steps": STEPS,
        "guidance_scale": 7.5,
        "request_id": f"lf-{uuid.uuid4().hex[:10]}",
        **extra,
    }


def wait_running(settings: Settings, request_id: str) -> None:
    found = collect(
        settings,
        [Topics(settings).status],
        lambda r: r["request_id"] == request_id and r["state"] == "RUNNING",
        lambda found: len(found) >= 1,
        timeout_s=60,
        idle_s=0,
    )
    assert found, f"{request_id} never started rendering"


def test_a_render_longer_than_the_poll_interval_finishes_once(slow):
    settings, _ = slow
    with Client(settings) as client:
        request_id = client.submit(**image())
    [completion] = completions_of(settings, {request_id})
    assert completion["status"] == "SUCCEEDED"
    assert completion["timings"]["render_ms"] >= SERVICE_MS * 0.9
    frames = collect(
        settings, Topics(settings).all_frames(), lambda r: r["request_id"] == request_id, lambda _: True
    )
    assert len(frames) == 1  # rendered once: no rebalance handed the task to a second render


def test_cancellation_stops_a_render_between_two_steps(slow):
    settings, _ = slow
    with Client(settings) as client:
        request_id = client.submit(**image())
        wait_running(settings, request_id)
        cancelled_at = time.monotonic()
        client.cancel(request_id, "life", "changed my mind")
    [completion] = completions_of(settings, {request_id})
    assert (completion["status"], completion["reason_code"]) == ("CANCELLED", "CANCELLED")
    assert time.monotonic() - cancelled_at < SERVICE_MS / 1000 / 2  # well before the render would end


def test_a_deadline_that_passes_in_the_queue_expires_without_rendering(slow):
    settings, _ = slow
    with Client(settings) as client:
        blocker = client.submit(**image())
        wait_running(settings, blocker)
        late = client.submit(**image(deadline_ms=now_ms() + 2_000))
        time.sleep(3.0)  # the deadline passes while the task waits behind the blocker
        client.cancel(blocker, "life")  # the renderer takes the late task next, some 9 s early
        [completion] = completions_of(settings, {late})
    assert (completion["status"], completion["reason_code"]) == ("EXPIRED", "DEADLINE_EXCEEDED")
    frames = collect(
        settings, Topics(settings).all_frames(), lambda r: r["request_id"] == late, lambda _: True
    )
    assert [f["outcome"] for f in frames] == ["EXPIRED"]  # answered by the renderer, never rendered


def test_rate_limit_state_survives_a_gatekeeper_restart(slow):
    settings, supervisor = slow
    with Client(settings) as client:
        first = client.submit(**image(tenant_id="one-at-a-time"))
        accepted = collect(
            settings,
            [Topics(settings).status],
            lambda r: r["request_id"] == first and r["state"] == "ACCEPTED",
            lambda found: len(found) >= 1,
            timeout_s=60,
            idle_s=0,
        )
        assert accepted
        time.sleep(2)  # let the gatekeeper commit: the bucket's changelog is what a restart reads back
        supervisor.signal("gatekeeper", signal.SIGTERM)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "gatekeeper" not in supervisor.alive() or supervisor.children["gatekeeper"].restarts == 0:
            supervisor.poll()
            assert time.monotonic() < deadline, "the gatekeeper did not come back"
            time.sleep(0.2)
        assert supervisor.wait_ready(READY_TIMEOUT_S)
        second = client.submit(**image(tenant_id="one-at-a-time"))
        [completion] = completions_of(settings, {second})
        client.cancel(first, "one-at-a-time")
    assert (completion["status"], completion["reason_code"]) == ("REJECTED", "RATE_LIMITED")


def test_a_low_priority_flood_is_shed_while_high_priority_preempts_it(slow):
    settings, _ = slow
    with Client(settings) as client:
        flood = [client.submit(**image(priority="LOW")) for _ in range(8)]
        wait_running(settings, flood[0])
        time.sleep(2.5)  # the backlog monitor samples once a second
        shed = [client.submit(**image(priority="LOW")) for _ in range(3)]
        urgent = client.submit(**image(priority="HIGH"))
        [high] = completions_of(settings, {urgent})
        [task] = collect(
            settings, Topics(settings).all_frames(), lambda r: r["request_id"] == urgent, lambda _: True
        )
        rejected = completions_of(settings, set(shed))
        for request_id in flood:
            client.cancel(request_id, "life")
    assert high["status"] == "SUCCEEDED"
    # It preempted the running LOW render at a step boundary (0.5 s here) instead of waiting out the
    # rest of it (about 9 s: the LOW render had been running for at least 2.5 s of its 12).
    assert task["started_at"] - task["enqueued_at"] < 2_000
    assert {(c["status"], c["reason_code"]) for c in rejected} == {("REJECTED", "OVERLOADED")}
    assert all(c["retry_after_ms"] > 0 for c in rejected)
