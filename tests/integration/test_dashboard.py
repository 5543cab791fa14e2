"""Every panel of the Grafana dashboard returns data from a live Prometheus, and the rules evaluate there.

The session's Prometheus (the ``prometheus`` fixture: Debian's binary as `aigc infra up` runs it, its
config and rules included) scrapes stand-in stages serving the contract's metric names
(tests/contract_exporter.py), found through the file-SD JSON as the supervisor's stages are. Each panel's
query runs through /api/v1/query with the dashboard's variables filled in until all have data. The same
check runs against a real pipeline with `infra.promql.check_dashboard` (see its module docstring).
"""

from __future__ import annotations

import re
import time

from infra.prometheus_server import prometheus_url
from infra.promql import PromClient, check_dashboard, load_dashboard, panel_queries, wait_for_dashboard
from plumbing.settings import Settings
from producers.metrics_summary import read_summary
from tests.conftest import unique
from tests.contract_exporter import contract_exporter

DATA_TIMEOUT_S = 60.0  # target discovery (file SD, instant) + a few 1 s scrapes + rule evaluations
RECORDED = (
    "priority:aigc_completions:rate1m",
    "priority:aigc_renderer_queue_wait_seconds:p99_1m",
    "priority:aigc_request_e2e_seconds:p99_1m",
    "reason:aigc_gatekeeper_rejections:rate1m",
    "pipeline:aigc_renderer_busy_ratio:avg",
    "priority:aigc_backlog_messages:sum",
)


def test_every_panel_returns_data(prometheus: Settings):
    client = PromClient(prometheus_url(prometheus))
    dashboard = load_dashboard()
    assert len(list(panel_queries(dashboard))) >= 20
    pipeline = unique("dash")
    # The check is not vacuous: with nothing scraped only the panels that read absence as 0 have data.
    empty = check_dashboard(client, dashboard, {"pipeline": pipeline})
    assert all(r.ok == ("vector(0)" in r.expr) for r in empty), [r.describe() for r in empty if r.ok]
    with contract_exporter(prometheus, pipeline) as exported:
        results = wait_for_dashboard(client, dashboard, {"pipeline": pipeline}, DATA_TIMEOUT_S)
        missing = [r.describe() for r in results if not r.ok]
        assert not missing, "panels without data:\n" + "\n".join(missing)
        # Each stand-in is scraped as a target of the aigc job, with its file-SD labels.
        targets = [t for t in client.targets() if t["labels"].get("pipeline") == pipeline]
        assert sorted(t["labels"]["stage"] for t in targets) == sorted(
            e["labels"]["stage"] for e in exported["entries"]
        )
        assert all(t["health"] == "up" and t["labels"]["job"] == "aigc" for t in targets)


def test_recording_rules_and_a_live_alert(prometheus: Settings):
    client = PromClient(prometheus_url(prometheus))
    pipeline = unique("rules")
    with contract_exporter(prometheus, pipeline):
        deadline = time.monotonic() + DATA_TIMEOUT_S
        while time.monotonic() < deadline:
            have = {name: client.query(f'{name}{{pipeline="{pipeline}"}}') for name in RECORDED}
            dead = [a for a in client.alerts() if a["labels"].get("pipeline") == pipeline]
            if all(have.values()) and any(a["labels"]["alertname"] == "AigcDeadLetters" for a in dead):
                break
            time.sleep(1)
        assert all(have.values()), {name: bool(v) for name, v in have.items()}
        # The stand-in dead-lettered at start: the first-dead-letter arm of the rule sees it.
        firing = {(a["labels"]["stage"], a["labels"]["reason"]) for a in dead if a["state"] == "firing"}
        assert firing == {("gatekeeper", "UNDECODABLE"), ("assembler", "STORAGE")}
        # Queue wait p99 of HIGH: observations of 30 ms fall in the (25 ms, 50 ms] bucket.
        (high,) = client.query(
            f'priority:aigc_renderer_queue_wait_seconds:p99_1m{{pipeline="{pipeline}", priority="HIGH"}}'
        )
        assert 0.025 < high.value <= 0.05


def test_stage_counts_read_back_for_a_period(prometheus: Settings):
    pipeline = unique("sum")
    start = time.time() - 1
    with contract_exporter(prometheus, pipeline):
        time.sleep(3)
        lines = read_summary(prometheus, start, pipeline=pipeline)
    by_stage = {line.split()[0]: line for line in lines}
    assert set(by_stage) == {"gatekeeper", "renderer", "assembler", "dead"}
    assert re.search(r"requests \d+ accepted, \d+ rejected", by_stage["gatekeeper"]), lines
    assert re.search(r"render tasks \d+ ok; batches \d+ \(mean size 4\.0\)", by_stage["renderer"]), lines
    assert re.search(r"completions \d+ SUCCEEDED", by_stage["assembler"]), lines
    # Born inside the period at 2 and 1: counted from zero, not lost as rate() would lose them.
    assert by_stage["dead"].endswith("1 assembler, 2 gatekeeper"), lines
