"""Stand-in stages for the metrics side: real prometheus_client HTTP servers serving the metric names of the
observability contract, listed in the file-SD JSON the way the supervisor lists real stages.

What the tests that use it check is the consuming side (Prometheus's config and rules, the dashboard's
queries, `aigc top`), not the stages. One server per role (gatekeeper, renderer, assembler, lag exporter),
each with its own registry; a background thread moves the numbers every ``TICK_S`` so rates, quantiles and
alerts have data. The fixed values (``BUSY``, ``BATCH``, ``LAG``, ``DEAD_LETTERS``, ...) are what the
tests expect to read back.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from infra.prometheus_server import targets_dir
from plumbing.settings import Settings

TICK_S = 0.1
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BUSY = 0.75
BATCH = 4
LAG = {"HIGH": 3, "NORMAL": 12, "LOW": 40}
QUEUE_WAIT_S = {"HIGH": 0.03, "NORMAL": 0.3, "LOW": 2.0}
E2E_S = {"HIGH": 0.8, "NORMAL": 4.0, "LOW": 20.0}
REJECTIONS = ("RATE_LIMITED", "MODERATED")  # one of each per tick
DEAD_LETTERS = {("gatekeeper", "UNDECODABLE"): 2, ("assembler", "STORAGE"): 1}


class _Roles:
    """The contract's metrics, one registry per stage role."""

    def __init__(self, pipeline: str) -> None:
        self.registries = {
            role: CollectorRegistry() for role in ("gatekeeper", "renderer", "assembler", "lag")
        }
        gk, rd, asm, lag = (self.registries[r] for r in ("gatekeeper", "renderer", "assembler", "lag"))
        for registry in self.registries.values():
            Gauge("aigc_stage_ready", "1 when the stage is ready", registry=registry).set(1)
        self.requests = Counter("aigc_gatekeeper_requests", "decisions", ["priority", "decision", "reason"],
                                registry=gk)  # fmt: skip
        self.blocks = Counter("aigc_gatekeeper_moderation_blocks", "blocks", ["category"], registry=gk)
        self.admission = Histogram("aigc_gatekeeper_admission_seconds", "admission", ["priority"],
                                   buckets=BUCKETS, registry=gk)  # fmt: skip
        Gauge("aigc_gatekeeper_bucket_tokens", "tokens", ["tenant", "kind"], registry=gk).labels(
            "acme", "requests"
        ).set(12)
        dead = Counter("aigc_dead_letters", "dead letters", ["stage", "reason"], registry=gk)
        dead_asm = Counter("aigc_dead_letters", "dead letters", ["stage", "reason"], registry=asm)
        for (stage, reason), n in DEAD_LETTERS.items():
            (dead if stage == "gatekeeper" else dead_asm).labels(stage, reason).inc(n)
        self.routed = Counter("aigc_messages_routed", "routed", ["stage", "topic", "reason"], registry=asm)
        self.queue_wait = Histogram("aigc_renderer_queue_wait_seconds", "wait", ["priority"], buckets=BUCKETS,
                                    registry=rd)  # fmt: skip
        self.step = Histogram("aigc_renderer_step_seconds", "step", buckets=BUCKETS, registry=rd)
        self.task = Histogram(
            "aigc_renderer_task_seconds", "task", ["priority"], buckets=BUCKETS, registry=rd
        )
        self.batch = Histogram("aigc_renderer_batch_size", "batch", buckets=(1, 2, 4, 8, 16, 32), registry=rd)
        Gauge("aigc_renderer_busy_ratio", "busy", registry=rd).set(BUSY)
        Gauge("aigc_renderer_suspended_batches", "suspended", registry=rd).set(0)
        self.preemptions = Counter("aigc_renderer_preemptions", "preemptions", registry=rd)
        Counter("aigc_renderer_cancellations", "cancellations", registry=rd)
        Counter("aigc_renderer_oom_splits", "oom splits", registry=rd)
        self.tasks = Counter("aigc_renderer_tasks", "tasks", ["priority", "outcome"], registry=rd)
        self.frames = Counter("aigc_assembler_frames", "frames", registry=asm)
        self.assembly = Histogram("aigc_assembler_assembly_seconds", "assembly", ["kind"], buckets=BUCKETS,
                                  registry=asm)  # fmt: skip
        self.encode = Histogram("aigc_assembler_encode_seconds", "encode", buckets=BUCKETS, registry=asm)
        self.storage = Histogram("aigc_storage_operation_seconds", "storage", ["backend", "operation"],
                                 buckets=BUCKETS, registry=asm)  # fmt: skip
        Counter("aigc_storage_errors", "errors", ["backend", "operation"], registry=asm)
        self.completions = Counter("aigc_completions", "completions", ["status", "priority"], registry=asm)
        self.e2e = Histogram("aigc_request_e2e_seconds", "e2e", ["priority"], buckets=BUCKETS, registry=asm)
        lag_gauge = Gauge("aigc_consumer_lag_messages", "lag", ["group", "topic", "partition", "priority"],
                          registry=lag)  # fmt: skip
        backlog = Gauge("aigc_share_group_backlog_messages", "backlog", ["group", "topic", "priority"],
                        registry=lag)  # fmt: skip
        for priority, n in LAG.items():
            topic = f"{pipeline}.requests.{priority.lower()}"
            lag_gauge.labels(f"{pipeline}-gatekeeper", topic, "0", priority).set(n)
            render = f"{pipeline}.render.default.{priority.lower()}"
            backlog.labels(f"{pipeline}-renderers-default", render, priority).set(n)

    def tick(self) -> None:
        for priority in LAG:
            self.requests.labels(priority, "accepted", "").inc()
            self.admission.labels(priority).observe(0.004)
            self.queue_wait.labels(priority).observe(QUEUE_WAIT_S[priority])
            self.task.labels(priority).observe(0.5)
            self.tasks.labels(priority, "ok").inc()
            self.completions.labels("SUCCEEDED", priority).inc()
            self.e2e.labels(priority).observe(E2E_S[priority])
        for reason in REJECTIONS:
            self.requests.labels("LOW", "rejected", reason).inc()
        self.blocks.labels("violence_gore").inc()
        self.step.observe(0.04)
        self.batch.observe(BATCH)
        self.preemptions.inc()
        self.frames.inc(4)
        self.assembly.labels("video").observe(0.2)
        self.encode.observe(0.1)
        self.storage.labels("s3", "put").observe(0.01)
        self.storage.labels("cassandra", "insert").observe(0.003)
        self.routed.labels("assembler", "aigc.retry.assembler.1s", "STORAGE").inc()


@contextmanager
def contract_exporter(settings: Settings, pipeline: str) -> Iterator[dict[str, Any]]:
    """Serve the contract's metrics for ``pipeline`` and list them in ``<home>/prometheus/targets``;
    yields the file-SD entries written. Everything is removed again on exit."""
    roles = _Roles(pipeline)
    servers = []
    entries = []
    names = {"gatekeeper": "gatekeeper", "renderer": "renderer-default-0", "assembler": "assembler",
             "lag": "lag-exporter"}  # fmt: skip
    for role, registry in roles.registries.items():
        server, _thread = start_http_server(0, addr="127.0.0.1", registry=registry)
        servers.append(server)
        stage = "lag_exporter" if role == "lag" else role
        labels = {"stage": stage, "instance_name": names[role], "pipeline": pipeline}
        entries.append({"targets": [f"127.0.0.1:{server.server_port}"], "labels": labels})
    stop = threading.Event()

    def move() -> None:
        while not stop.wait(TICK_S):
            roles.tick()

    mover = threading.Thread(target=move, name="contract-exporter", daemon=True)
    mover.start()
    path = write_targets(settings, pipeline, entries)
    try:
        yield {"path": path, "entries": entries}
    finally:
        path.unlink(missing_ok=True)
        stop.set()
        mover.join()
        for server in servers:
            server.shutdown()
            server.server_close()


def write_targets(settings: Settings, pipeline: str, entries: list[dict[str, Any]]) -> Path:
    """The file-SD file of ``pipeline``, written as the contract says: a temporary file renamed over it."""
    folder = targets_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{pipeline}.json"
    tmp = folder / f".{pipeline}.json.tmp"
    tmp.write_text(json.dumps(entries), encoding="utf-8")
    os.replace(tmp, path)
    return path
