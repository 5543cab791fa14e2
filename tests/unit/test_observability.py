"""The pure parts of observability: readiness, the HTTP endpoints, bounded labels, the top-N bucket gauge,
the busy window, JSON log lines and the routing counters."""

from __future__ import annotations

import io
import json
import logging
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import REGISTRY

from gpu_consumers.metrics import BusyWindow
from plumbing.dead_letters import Failure, Original, dead_letter
from plumbing.errors import DecodeError
from plumbing.lag_exporter import topic_priority
from plumbing.log_format import ContextFilter, bind, bind_message, json_formatter
from plumbing.observability import Readiness, bounded, priority_label, serve
from plumbing.settings import Settings, Tier
from schemas.codec import default_codec
from stream_processors.gatekeeper.metrics import BucketLevels
from stream_processors.gatekeeper.metrics import topic_priority as request_topic_priority
from stream_processors.gatekeeper.tables import Bucket


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_readiness_is_the_conjunction_of_named_conditions() -> None:
    readiness = Readiness("kafka", "model")
    assert readiness.unmet() == ["kafka", "model"] and not readiness.ready
    readiness.mark("model")
    readiness.require("storage")
    assert readiness.unmet() == ["kafka", "storage"]
    readiness.mark("kafka")
    readiness.mark("storage")
    assert readiness.ready
    readiness.mark("kafka", False)  # a rebalance: unready again until it ends
    assert readiness.unmet() == ["kafka"]
    assert readiness.conditions() == {"kafka": False, "model": True, "storage": True}


def test_check_until_met_marks_once_the_check_passes() -> None:
    readiness = Readiness()
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise OSError("not yet")

    readiness.check_until_met("storage", check, interval_s=0.01)
    for _ in range(200):
        if readiness.ready:
            break
        time.sleep(0.01)
    assert readiness.ready and len(calls) == 3


def test_endpoints_answer_health_readiness_and_metrics() -> None:
    obs = serve(Settings(metrics_port=0), "gatekeeper", "assigned")
    try:
        base = f"http://127.0.0.1:{obs.port}"
        assert get(f"{base}/healthz")[0] == 200
        code, body = get(f"{base}/readyz")
        assert code == 503
        assert json.loads(body)["unmet"] == ["assigned"]
        assert b"aigc_stage_ready 0.0" in get(f"{base}/metrics")[1]
        obs.readiness.mark("assigned")
        code, body = get(f"{base}/readyz")
        assert code == 200 and json.loads(body)["ready"] is True
        assert b"aigc_stage_ready 1.0" in get(f"{base}/metrics")[1]
        assert get(f"{base}/nothing")[0] == 404
    finally:
        obs.close()


def test_no_port_no_server() -> None:
    obs = serve(Settings(), "relay")
    assert obs.server is None and obs.port is None


@pytest.mark.parametrize(
    ("value", "label"), [("HIGH", "HIGH"), ("low", "LOW"), (None, "NORMAL"), ("req-123", "NORMAL")]
)
def test_priority_labels_are_bounded(value: object, label: str) -> None:
    assert priority_label(value) == label


def test_free_text_becomes_other() -> None:
    assert bounded("hate", ("hate", "sexual")) == "hate"
    assert bounded("a request id 42", ("hate",)) == "other"


def test_class_of_a_topic() -> None:
    assert topic_priority("aigc.requests.high") == "HIGH"
    assert topic_priority("aigc.render.default.low") == "LOW"
    assert topic_priority("aigc.frames") == ""
    assert topic_priority("aigc.frames.high") == "HIGH"  # per-class sink inputs
    assert topic_priority("aigc.retry.gatekeeper.1s") == ""
    assert request_topic_priority("e2eabc.requests.normal") == "NORMAL"


def test_bucket_gauge_exports_only_the_emptiest_tenants() -> None:
    tier = Tier(requests_per_s=1.0, request_burst=10.0, cost_per_s=1.0, cost_burst=10.0)
    levels = BucketLevels(top_n=3, tier_of=lambda tenant: tier)
    now = 1_000_000.0
    for i in range(30):
        levels.update(f"tenant-{i}", Bucket(float(i % 10), 10.0, now))
    rows = levels.levels(now)
    assert len(rows) == 3
    assert {tenant for tenant, _, _ in rows} == {"tenant-0", "tenant-10", "tenant-20"}
    # Refilled to the time of the scrape: two seconds later each holds two more request tokens.
    assert [requests for _, requests, _ in levels.levels(now + 2000)] == [2.0, 2.0, 2.0]
    families = list(levels.collect())
    assert len(families[0].samples) == 6  # three tenants, requests and cost each


def test_busy_window_fraction() -> None:
    now = [100.0]
    window = BusyWindow(clock=lambda: now[0])
    now[0] = 110.0
    window.busy()
    now[0] = 115.0
    window.idle()
    assert window.ratio() == pytest.approx(0.5)
    window.busy()
    now[0] = 120.0  # busy since 115, still running
    assert window.ratio() == pytest.approx(1.0)
    assert window.seconds() == pytest.approx(10.0)
    window.idle()
    now[0] = 140.0
    assert window.ratio() == 0.0


def test_json_lines_carry_stage_request_and_trace() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(json_formatter())
    handler.addFilter(ContextFilter("renderer-default-0"))
    logger = logging.getLogger("test.observability.json")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        trace = "0af7651916cd43dd8448eb211c80319c"
        bind_message([("request_id", b"req-1"), ("traceparent", f"00-{trace}-b7ad6b7169203331-01".encode())])
        logger.warning("rendered %d frames", 4)
        bind(None)
        logger.info("idle")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "rendered 4 frames" and first["level"] == "WARNING"
    assert (first["stage"], first["request_id"], first["trace_id"]) == ("renderer-default-0", "req-1", trace)
    assert "time" in first
    assert second["stage"] == "renderer-default-0" and "request_id" not in second and "trace_id" not in second


def test_dead_letters_are_counted_by_stage_topic_and_reason() -> None:
    labels = {"stage": "gatekeeper", "reason": "UNDECODABLE"}
    before = REGISTRY.get_sample_value("aigc_dead_letters_total", labels) or 0.0
    original = Original("t.requests.high", 0, 7, 0, b"k", b"junk", [])
    failure = Failure.of("gatekeeper", DecodeError("bad bytes", code="UNDECODABLE"), 1, 1, 1)
    dead_letter(default_codec(), original, failure, topic="t.dlq.gatekeeper")
    assert REGISTRY.get_sample_value("aigc_dead_letters_total", labels) == before + 1
    routed = {"stage": "gatekeeper", "topic": "t.dlq.gatekeeper", "reason": "UNDECODABLE"}
    assert (REGISTRY.get_sample_value("aigc_messages_routed_total", routed) or 0) >= 1


def test_metrics_off_records_nothing_but_readiness_still_answers() -> None:
    from plumbing import metrics

    labels = {"backend": "s3", "operation": "UnitOff"}
    obs = serve(Settings(metrics_port=0, observability={"metrics": False}), "relay", "assigned")
    try:
        metrics.storage_call("s3", "UnitOff", 0.1, failed=True)
        assert REGISTRY.get_sample_value("aigc_storage_errors_total", labels) is None
        assert get(f"http://127.0.0.1:{obs.port}/readyz")[0] == 503
    finally:
        obs.close()
        serve(Settings(), "relay")  # metrics back on for the other tests
