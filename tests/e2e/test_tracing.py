"""Traces in a real pipeline: `aigc trace` from the pipeline's own records, and spans over OTLP/HTTP.

A small pipeline (synthetic renderer) starts under the supervisor with its OTLP endpoint pointed at a tiny
HTTP server in this test (a real socket taking the protobuf POSTs the exporter sends). One image request
goes through; then `aigc trace <id>` names every stage and the terminal state, and the spans of the
gatekeeper, the renderer and the assembler arrived, all in the trace of the request's traceparent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from infra.pipeline import running_pipeline
from plumbing.headers import trace_id
from plumbing.kafka_clients import header_map, make_consumer
from plumbing.settings import ModelSpec, ObservabilitySettings, Settings
from plumbing.topics import Topics
from producers.client import Client
from tests.e2e.conftest import completions_of

SPANS_TIMEOUT_S = 30.0


class Collector(ThreadingHTTPServer):
    """An OTLP/HTTP receiver: every span POSTed to /v1/traces, with its service name."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.spans)


class _Handler(BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        assert self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
        request = ExportTraceServiceRequest.FromString(body)
        spans = []
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    attributes = {a.key: a.value.string_value or a.value.int_value for a in span.attributes}
                    spans.append({
                        "service": resource["service.name"], "name": span.name,
                        "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                        "parent": span.parent_span_id.hex(), "attributes": attributes,
                    })  # fmt: skip
        with self.server.lock:
            self.server.spans += spans
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def settings(
    infra: Settings, tmp_path: Path, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """A pipeline of its own (synthetic renderer) exporting its spans to ``collector``."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # the stages export spans within 0.2 s
    settings = infra.model_copy(
        update={
            "home": tmp_path / "home",
            "models": {"tiny-sd": ModelSpec(path=tmp_path / "no-model", backend="synthetic", max_batch=4)},
            "output_check": infra.output_check.model_copy(update={"enabled": False}),
            "observability": ObservabilitySettings(otlp_endpoint=collector.url),
        }
    )
    with running_pipeline(settings, synthetic_ms=5.0, isolate="trc", drop=True) as pipe:
        yield pipe.settings


def request_traceparent(settings: Settings, request_id: str) -> str:
    """The traceparent the SDK put on the request (the root of its trace)."""
    consumer = make_consumer(settings, f"trc-{uuid.uuid4().hex}", "test")
    consumer.subscribe([Topics(settings).requests("HIGH")])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if (
                msg is not None
                and not msg.error()
                and header_map(msg).get("request_id") == request_id.encode()
            ):
                return header_map(msg)["traceparent"].decode()
    finally:
        consumer.close()
    raise AssertionError("request not found on its topic")


def test_trace_timeline_and_otlp_spans_of_one_request(settings: Settings, collector: Collector) -> None:
    env = {**os.environ, **settings.to_env()}
    with Client(settings) as client:
        request_id = client.submit(
            prompt="a lighthouse at dusk", tenant_id="trace-tenant", model="tiny-sd", width=64, height=64,
            steps=2, guidance_scale=7.5, priority="HIGH",
        )  # fmt: skip
    [completion] = completions_of(settings, {request_id})
    assert completion["status"] == "SUCCEEDED"
    root = trace_id(request_traceparent(settings, request_id))

    # (a) `aigc trace`: every stage and the terminal state, from the pipeline's records
    command = [sys.executable, "-m", "aigc", "trace", request_id]
    text = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert text.returncode == 0, text.stderr
    for word in (
        "SUCCEEDED",
        "created",
        "admitted",
        f"task {request_id}",
        "assembling",
        "completed",
        str(root),
    ):
        assert word in text.stdout, (word, text.stdout)
    as_json = subprocess.run([*command, "--json"], env=env, capture_output=True, text=True, timeout=120,
                             check=True)  # fmt: skip
    timeline = json.loads(as_json.stdout)
    assert timeline["status"] == "SUCCEEDED" and timeline["trace_id"] == root
    assert timeline["stages"] == ["producer", "gatekeeper", "renderer", "assembler"]
    [task] = timeline["tasks"]
    assert task["outcome"] == "RENDERED" and task["worker_id"] and task["batch_size"] == 1

    # (b) spans over OTLP/HTTP: gatekeeper, renderer and assembler, one trace, parented stage to stage
    wanted = {"gatekeeper.admit", "renderer.task", "assembler.request"}
    deadline = time.monotonic() + SPANS_TIMEOUT_S
    while True:
        spans = [s for s in collector.snapshot() if s["attributes"].get("request_id") == request_id]
        if wanted <= {s["name"] for s in spans} or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    names = {s["name"]: s for s in spans}
    assert wanted <= set(names), sorted(names)
    assert {s["trace_id"] for s in collector.snapshot() if s["trace_id"] == root}
    assert {s["trace_id"] for s in spans} == {root}
    services = {s["service"] for s in spans}
    assert {"aigc-gatekeeper", "aigc-renderer", "aigc-assembler"} <= services, services
    admit, task_span, assemble = (
        names["gatekeeper.admit"],
        names["renderer.task"],
        names["assembler.request"],
    )
    assert task_span["parent"] == admit["span_id"]  # the render task's traceparent is the admission span
    assert assemble["parent"] == task_span["span_id"]  # FramesRendered carries the render task span
    assert admit["attributes"]["outcome"] == "ACCEPTED" and admit["attributes"]["priority"] == "HIGH"
    assert assemble["attributes"]["outcome"] == "SUCCEEDED"
    assert admit["attributes"]["tenant"] == "trace-tenant"
    steps = {s["name"] for s in collector.snapshot() if s["trace_id"] == root}
    assert {"renderer.render", "renderer.upload", "assembler.assemble", "assembler.store"} <= steps, steps
