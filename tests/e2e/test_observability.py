"""Every stage's /metrics, /healthz and /readyz in a real pipeline, and the Prometheus file-SD file.

A small pipeline (synthetic renderer) starts under the supervisor; each stage's /readyz answers 503 until
it is ready and 200 after; the targets file lists every stage process; after one request, each stage's
/metrics holds the expected series with the expected counts; the file is gone once the pipeline stops.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from infra.bootstrap import bootstrap
from infra.pipeline import READY_TIMEOUT_S
from plumbing.settings import GatekeeperSettings, ModelSpec, Settings
from plumbing.supervisor import Supervisor, pipeline_stages, targets_path
from producers.client import Client
from tests.e2e.conftest import completions_of

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""  # not listening yet


def scrape(port: int) -> Samples:
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def settings(infra: Settings, tmp_path: Path) -> Settings:
    tag = uuid.uuid4().hex[:8]
    settings = infra.model_copy(
        update={
            "home": tmp_path / "home",
            "kafka": infra.kafka.model_copy(update={"topic_prefix": f"obs{tag}"}),
            "cassandra": infra.cassandra.model_copy(update={"keyspace": f"obs_{tag}"}),
            "models": {"tiny-sd": ModelSpec(path=tmp_path / "no-model", backend="synthetic", max_batch=4)},
            "gatekeeper": GatekeeperSettings(app_id=f"obs-{tag}-gatekeeper"),
            "output_check": infra.output_check.model_copy(update={"enabled": False}),
        }
    )
    bootstrap(settings, echo=lambda _: None)
    return settings


def test_stages_serve_readiness_metrics_and_discovery(settings: Settings) -> None:
    stages = pipeline_stages(settings, renderers=1, synthetic_ms=5.0)
    targets = targets_path(settings)
    supervisor = Supervisor(stages, settings.to_env(), settings.home / "logs", echo=print, targets=targets,
                            pipeline=settings.kafka.topic_prefix)  # fmt: skip
    supervisor.start()
    try:
        ports = {name: child.port for name, child in supervisor.children.items()}
        # -- /readyz: 503 while starting, 200 once ready; /healthz: 200 as soon as it answers
        seen: dict[str, list[int]] = {name: [] for name in ports}
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(codes and codes[-1] == 200 for codes in seen.values()):
            assert time.monotonic() < deadline, f"not ready: {seen}; logs in {settings.home / 'logs'}"
            exited = set(ports) - set(supervisor.alive())
            assert not exited, f"{exited} exited; logs in {settings.home / 'logs'}"
            for name, port in ports.items():
                if not seen[name] or seen[name][-1] != 200:
                    status, body = get(f"http://127.0.0.1:{port}/readyz")
                    if status:
                        seen[name].append(status)
                        if status == 503:
                            assert json.loads(body)["unmet"], body
            time.sleep(0.05)
        for name, codes in seen.items():
            assert codes[-1] == 200 and set(codes) <= {503, 200}, (name, codes)
            assert get(f"http://127.0.0.1:{ports[name]}/healthz")[0] == 200
        # The slow starters were seen not ready first (the lag exporter may be ready before it is asked).
        for name in ("gatekeeper", "renderer-default-0", "assembler"):
            assert seen[name][0] == 503, (name, seen[name])
        assert supervisor.wait_ready(30)

        # -- file service discovery: every stage process, with its labels
        entries = json.loads(targets.read_text())
        listed = {e["labels"]["instance_name"]: e for e in entries}
        assert set(listed) == set(ports)
        for spec in stages:
            entry = listed[spec.name]
            assert entry["targets"] == [f"127.0.0.1:{ports[spec.name]}"]
            assert entry["labels"] == {
                "stage": spec.stage,
                "instance_name": spec.name,
                "pipeline": settings.kafka.topic_prefix,
            }

        # -- one request through the pipeline
        with Client(settings) as client:
            request_id = client.submit(
                prompt="a lighthouse at dusk", tenant_id="obs-tenant", model="tiny-sd", width=64, height=64,
                steps=2, guidance_scale=7.5, priority="HIGH",
            )  # fmt: skip
        [completion] = completions_of(settings, {request_id})
        assert completion["status"] == "SUCCEEDED"

        gatekeeper = scrape(ports["gatekeeper"])
        accepted = {"priority": "HIGH", "decision": "accepted", "reason": ""}
        assert value(gatekeeper, "aigc_gatekeeper_requests_total", **accepted) == 1
        assert value(gatekeeper, "aigc_gatekeeper_admission_seconds_count", priority="HIGH") == 1
        tokens = value(gatekeeper, "aigc_gatekeeper_bucket_tokens", tenant="obs-tenant", kind="requests")
        assert tokens is not None

        renderer = scrape(ports["renderer-default-0"])
        assert value(renderer, "aigc_renderer_tasks_total", priority="HIGH", outcome="rendered") == 1
        assert value(renderer, "aigc_renderer_queue_wait_seconds_count", priority="HIGH") == 1
        assert value(renderer, "aigc_renderer_task_seconds_count", priority="HIGH") == 1
        assert value(renderer, "aigc_renderer_batch_size_count") == 1
        assert (value(renderer, "aigc_renderer_step_seconds_count") or 0) >= 1
        assert value(renderer, "aigc_renderer_busy_ratio") is not None
        assert (value(renderer, "aigc_storage_operation_seconds_count", backend="s3", operation="PutObject")
                or 0) >= 1  # fmt: skip

        assembler = scrape(ports["assembler"])
        assert value(assembler, "aigc_completions_total", status="SUCCEEDED", priority="HIGH") == 1
        assert value(assembler, "aigc_request_e2e_seconds_count", priority="HIGH") == 1
        assert value(assembler, "aigc_assembler_frames_total") == 1
        assert value(assembler, "aigc_assembler_assembly_seconds_count", kind="image") == 1
        for operation in ("write_terminal", "terminal"):
            cassandra = value(assembler, "aigc_storage_operation_seconds_count", backend="cassandra",
                              operation=operation)  # fmt: skip
            assert (cassandra or 0) >= 1, operation
        assert (value(assembler, "aigc_storage_operation_seconds_count", backend="s3", operation="CopyObject")
                or 0) >= 1  # fmt: skip

        # The lag exporter sees the gatekeeper's group on the request topics, and the render queue drained.
        exporter_port = ports["lag-exporter"]
        prefix = settings.kafka.topic_prefix
        deadline = time.monotonic() + 60
        while True:
            lag = scrape(exporter_port)
            request_lag = [
                v for (name, labels), v in lag.items()
                if name == "aigc_consumer_lag_messages" and ("topic", f"{prefix}.requests.high") in labels
                and ("group", settings.gatekeeper.app_id) in labels
            ]  # fmt: skip
            share = {"group": f"{prefix}.renderer.default.share", "topic": f"{prefix}.render.default.high"}
            backlog = value(lag, "aigc_share_group_backlog_messages", **share, priority="HIGH")
            if request_lag and sum(request_lag) == 0 and backlog == 0:
                break
            assert time.monotonic() < deadline, (request_lag, backlog)
            time.sleep(1)

        for name, port in ports.items():
            assert value(scrape(port), "aigc_stage_ready") == 1, name
            for (metric, labels), _ in scrape(port).items():
                assert request_id not in dict(labels).values(), (name, metric)
    finally:
        supervisor.stop()
    assert not targets.exists()
