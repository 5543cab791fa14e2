"""`infra.pipeline.running_pipeline` itself on the real stack: a pipeline of its own (synthetic renderer)
completes a request, and when the block ends no stage process is left and, with ``drop``, neither are
the run's topics and keyspace."""

from __future__ import annotations

import time
from pathlib import Path

from infra.pipeline import running_pipeline
from plumbing.kafka_clients import make_admin
from plumbing.metadata import connect
from plumbing.settings import ModelSpec, Settings
from producers.client import Client

RESULT_TIMEOUT_S = 120.0
DELETE_TIMEOUT_S = 30.0  # the broker deletes topics asynchronously; its metadata follows shortly after


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


def test_a_running_pipeline_completes_a_request_and_leaves_nothing_behind(infra: Settings, tmp_path: Path):
    synthetic = ModelSpec(path=Path("/synthetic"), backend="synthetic")
    settings = infra.model_copy(update={"home": tmp_path, "models": {"synth": synthetic}})
    with running_pipeline(settings, synthetic_ms=5.0, isolate="pipe", drop=True) as pipe:
        run = pipe.settings
        assert (
            run.kafka.topic_prefix.startswith("pipe") and run.kafka.topic_prefix != infra.kafka.topic_prefix
        )
        assert run.cassandra.keyspace != infra.cassandra.keyspace
        assert sorted(pipe.supervisor.alive()) == sorted(s.name for s in pipe.supervisor.stages)
        with Client(run) as client:
            request_id = client.submit(
                tenant_id="pipe", prompt="a lantern", model="synth", width=64, height=64, steps=2,
                guidance_scale=7.5,
            )  # fmt: skip
            completion = client.wait(request_id, timeout_s=RESULT_TIMEOUT_S)
        assert completion.status == "SUCCEEDED", completion
        assert run_topics(run) and keyspace_exists(run)
        pids = [child.proc.pid for child in pipe.supervisor.children.values()]

    assert pipe.supervisor.alive() == []
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]  # exited and reaped
    deadline = time.monotonic() + DELETE_TIMEOUT_S
    while (left := run_topics(run)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == []
    assert not keyspace_exists(run)
    assert (tmp_path / "logs" / run.kafka.topic_prefix / "gatekeeper.log").exists()
