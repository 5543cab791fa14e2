"""Spans parented through ``traceparent``, outputs carrying the span's own, and no SDK without an endpoint."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from plumbing import headers, tracing
from plumbing.headers import TRACEPARENT, continue_headers, pipeline_headers, trace_id
from plumbing.settings import ObservabilitySettings, Settings
from schemas.records import LatentRecipe, RenderTask

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider.get_tracer("test"))
    try:
        yield exporter
    finally:
        tracing.install(None)


def consumed(traceparent: str = PARENT) -> dict[str, bytes]:
    return {
        k: v if isinstance(v, bytes) else str(v).encode()
        for k, v in pipeline_headers("r1", "acme", traceparent)
    }


def test_without_an_endpoint_no_sdk_is_loaded_and_nothing_is_recorded() -> None:
    """In a fresh interpreter: setup with no endpoint imports no SDK or exporter, and a stage's span
    helpers and headers behave as before (a new span id in the parent's trace)."""
    code = f"""
import sys
from plumbing import headers, tracing
from plumbing.settings import Settings
assert tracing.setup(Settings(), "gatekeeper") is False
assert not tracing.enabled() and headers.span_traceparent is None
with tracing.consuming("gatekeeper.admit", [("traceparent", b"{PARENT}")]) as span:
    assert not span.is_recording()
    tracing.annotate(outcome="ACCEPTED")
    out = dict(headers.continue_headers({{"traceparent": b"{PARENT}"}}, "r", "t"))
assert out["traceparent"].decode().startswith("00-{TRACE}-") and out["traceparent"] != b"{PARENT}"
loaded = sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter")))
assert not loaded, loaded
"""
    env = {"PATH": "/usr/bin:/bin"}  # no OTEL_* from the caller's environment
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr


def test_endpoint_comes_from_settings_then_the_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    plain = Settings()
    assert tracing.endpoint(plain) is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")
    assert tracing.endpoint(plain) == "http://collector:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://other:4318/custom")
    assert tracing.endpoint(plain) == "http://other:4318/custom"
    configured = Settings(observability=ObservabilitySettings(otlp_endpoint="http://mine:4318"))
    assert tracing.endpoint(configured) == "http://mine:4318/v1/traces"


def test_a_stage_span_is_the_child_of_the_message_and_the_parent_of_its_outputs(
    spans: InMemorySpanExporter,
) -> None:
    with tracing.consuming("gatekeeper.admit", list(consumed().items())) as span:
        tracing.annotate(priority="HIGH", outcome="ACCEPTED")
        out = dict(continue_headers(consumed(), "r1", "acme"))
    [finished] = spans.get_finished_spans()
    context = span.get_span_context()
    assert f"{context.trace_id:032x}" == TRACE
    assert finished.parent is not None and f"{finished.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert out[TRACEPARENT] == f"00-{TRACE}-{context.span_id:016x}-01".encode()
    assert dict(finished.attributes or {}) == {
        "request_id": "r1",
        "tenant": "acme",
        "priority": "HIGH",
        "outcome": "ACCEPTED",
    }


def test_steps_are_children_and_annotate_addresses_the_unit_of_work(spans: InMemorySpanExporter) -> None:
    @tracing.step("assembler.store")
    def store() -> str:
        tracing.annotate(outcome="SUCCEEDED")
        return "stored"

    with tracing.consuming("assembler.request", consumed(), outcome="COLLECTED"):
        assert store() == "stored"
    assert store() == "stored"  # outside a unit of work: no span
    by_name = {s.name: s for s in spans.get_finished_spans()}
    assert set(by_name) == {"assembler.request", "assembler.store"}
    unit, step = by_name["assembler.request"], by_name["assembler.store"]
    assert step.parent is not None and step.parent.span_id == unit.context.span_id
    assert (unit.attributes or {})["outcome"] == "SUCCEEDED"


def test_a_message_without_a_valid_traceparent_starts_one_trace_for_span_and_outputs(
    spans: InMemorySpanExporter,
) -> None:
    with tracing.consuming("gatekeeper.admit", consumed("00-garbage")) as span:
        out = dict(continue_headers(consumed("00-garbage"), "r1", "acme"))
    assert trace_id(out[TRACEPARENT]) == f"{span.get_span_context().trace_id:032x}"


def test_an_unrelated_current_span_does_not_adopt_another_traces_outputs(spans: InMemorySpanExporter) -> None:
    other = f"00-{'a' * 32}-{'b' * 16}-01"
    with tracing.consuming("assembler.request", consumed()):
        out = dict(continue_headers(consumed(other), "r2", "acme"))
    assert trace_id(out[TRACEPARENT]) == "a" * 32


def test_an_unsampled_parent_records_nothing(spans: InMemorySpanExporter) -> None:
    with tracing.consuming("gatekeeper.admit", consumed(f"00-{TRACE}-00f067aa0ba902b7-00")) as span:
        assert not span.is_recording()
    assert not spans.get_finished_spans()


def test_a_render_task_span_starts_with_its_batch_and_records_its_wait(spans: InMemorySpanExporter) -> None:
    record = RenderTask(
        task_id="r1-0", request_id="r1", tenant_id="t", priority="LOW", kind="IMAGE", pool="gpu", model="m",
        prompt="p", width=64, height=64, steps=1, guidance_scale=1.0, seed=1, frame_start=0, frame_end=1,
        frame_count=1, recipe=LatentRecipe(seed_start=1, seed_end=1, positions=[0.0]), output_format="PNG",
        created_at=900, accepted_at=950, enqueued_at=1_000,
    )  # fmt: skip
    with tracing.render_task(consumed(), record, 1_250, batch_size=2, outcome="RENDERED"):
        pass
    by_name = {s.name: s for s in spans.get_finished_spans()}
    task, render = by_name["renderer.task"], by_name["renderer.render"]
    assert task.start_time == 1_250 * 1_000_000 and render.start_time == task.start_time
    assert render.parent is not None and render.parent.span_id == task.context.span_id
    attributes = dict(task.attributes or {})
    assert attributes["queue_wait_ms"] == 250 and attributes["batch_size"] == 2
    assert attributes["priority"] == "LOW" and attributes["outcome"] == "RENDERED"


def test_a_routed_failure_outside_a_span_gets_a_span_of_its_own(spans: InMemorySpanExporter) -> None:
    tracing.failure(consumed(), "renderer", "RETRYING", "aigc.retry.renderer.1s", "OOM", RuntimeError("x"))
    [span] = spans.get_finished_spans()
    assert span.name == "renderer.failure" and f"{span.context.trace_id:032x}" == TRACE
    assert (span.attributes or {})["outcome"] == "RETRYING"
    assert span.events[0].name == "exception"


def test_the_relay_puts_its_own_span_on_the_message_it_sends_back(spans: InMemorySpanExporter) -> None:
    sent = tracing.relayed([*consumed().items(), ("aigc.attempts", b"1")], attempt=1, error_code="X")
    [span] = spans.get_finished_spans()
    assert dict(sent)[TRACEPARENT] == f"00-{TRACE}-{span.context.span_id:016x}-01".encode()
    assert [k for k, _ in sent].count(TRACEPARENT) == 1
    assert (span.attributes or {})["retries"] == 1


def test_install_none_restores_plain_headers() -> None:
    assert headers.span_traceparent is None and not tracing.enabled()
