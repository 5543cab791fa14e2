"""The alert rules, the dashboard and `aigc top` against a real pipeline and the real Prometheus.

A pipeline of its own (synthetic renderers) runs under a steady LOW load, the test Prometheus scraping
its stages through the file-SD targets the supervisor writes. Every dashboard panel must return data
once the load has run, and `aigc top` in a real terminal (tmux) must show the pipeline's stages and its
LOW traffic; then the renderers are frozen (SIGSTOP: alive, consuming nothing) while the load goes on,
and `AigcLagGrowing` must fire for the LOW class of this pipeline."""

from __future__ import annotations

import itertools
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from infra.pipeline import running_pipeline
from infra.prometheus_server import prometheus_url
from infra.promql import PromClient, load_dashboard, wait_for_dashboard
from plumbing.settings import ModelSpec, Settings
from producers.client import Client
from tests.integration.test_top import aigc_env, class_row, wait_for_screen

FIRE_TIMEOUT_S = 150.0  # deriv over 1 m, `for: 20s`, 1 s scrapes and rule evaluation on a busy machine
PANELS_TIMEOUT_S = 60.0


def submit_steadily(settings: Settings, rate: float, stop: threading.Event) -> None:
    """LOW images at ``rate``, every fifth a short video (so the encoder's panel has data too)."""
    with Client(settings) as client:
        for n in itertools.count():
            if stop.is_set():
                return
            video = {"video": {"num_frames": 4, "fps": 4}} if n % 5 == 4 else {}
            client.submit(
                tenant_id="alerts", prompt="a lantern", model="synth", width=64, height=64, steps=2,
                guidance_scale=7.5, priority="LOW", **video,
            )  # fmt: skip
            stop.wait(1 / rate)


def firing(client: PromClient, name: str, pipeline: str) -> list[dict]:
    return [
        a
        for a in client.alerts()
        if a["labels"].get("alertname") == name
        and a["labels"].get("pipeline") == pipeline
        and a["state"] == "firing"
    ]


def test_every_panel_has_data_and_the_lag_alert_fires_when_the_renderers_stop(
    infra: Settings, prometheus: Settings, tmux: Any
) -> None:
    synthetic = ModelSpec(path=Path("/synthetic"), backend="synthetic")
    settings = infra.model_copy(update={"models": {"synth": synthetic}})
    prom = PromClient(prometheus_url(prometheus))
    stop = threading.Event()
    with running_pipeline(settings, renderers=2, synthetic_ms=20.0, isolate="alerts", drop=True) as pipe:
        run = pipe.settings
        name = run.kafka.topic_prefix
        load = threading.Thread(target=submit_steadily, args=(run, 4.0, stop), daemon=True)
        load.start()
        renderers = [n for n in pipe.supervisor.children if n.startswith("renderer")]
        try:
            panels = wait_for_dashboard(prom, load_dashboard(), {"pipeline": name}, PANELS_TIMEOUT_S)
            assert [r.describe() for r in panels if not r.ok] == []

            start, screen = tmux
            argv = [sys.executable, "-m", "aigc", "top", "--pipeline", name, "--window", "5"]
            start(shlex.join(argv), aigc_env(run, prometheus.infra.prometheus_port))
            stages = [("gatekeeper", "gatekeeper", "yes", "yes"), ("assembler", "assembler", "yes", "yes")]
            stages += [("renderer", r, "yes", "yes") for r in renderers]
            text = wait_for_screen(screen, stages, f"pipeline {name}")
            assert float(class_row(text, "LOW")[1]) > 0, text  # LOW admitted per second
            assert firing(prom, "AigcLagGrowing", name) == []  # the renderers keep up

            for renderer in renderers:
                pipe.supervisor.signal(renderer, signal.SIGSTOP)
            deadline = time.monotonic() + FIRE_TIMEOUT_S
            while not (fired := firing(prom, "AigcLagGrowing", name)) and time.monotonic() < deadline:
                time.sleep(2)
            assert fired, f"AigcLagGrowing did not fire for {name} within {FIRE_TIMEOUT_S:.0f} s"
            assert "LOW" in {a["labels"].get("priority") for a in fired}
        finally:
            stop.set()
            for renderer in renderers:
                pipe.supervisor.signal(renderer, signal.SIGCONT)
            load.join(10)
