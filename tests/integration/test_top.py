"""`aigc top` in a real terminal (tmux) against live metrics: through Prometheus, and straight from the
stages when Prometheus is not running.

The stand-in stages of tests/contract_exporter.py serve fixed gauges (busy fraction, lag, dead letters)
and steady counters; the test reads the screen with ``tmux capture-pane`` and looks for those values.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

import pytest

from plumbing.settings import Settings
from tests.conftest import unique
from tests.contract_exporter import BUSY, DEAD_LETTERS, LAG, contract_exporter

SCREEN_TIMEOUT_S = 45.0


def aigc_env(settings: Settings, prometheus_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIGC_")}
    env.update(AIGC_HOME=str(settings.home), AIGC_INFRA__PROMETHEUS_PORT=str(prometheus_port))
    return env


def expected_rows(pipeline: str) -> list[tuple[str, ...]]:
    """Table rows (their first cells) that must be on the screen."""
    return [
        *((p,) for p in LAG),
        ("renderer-default-0", f"{BUSY * 100:.0f}%", "4.0"),  # busy fraction and mean batch size
        ("rejected", "MODERATED"),
        ("rejected", "RATE_LIMITED"),
        *((f"DLQ {stage}", reason, str(n)) for (stage, reason), n in DEAD_LETTERS.items()),
        ("lag_exporter", "lag-exporter", "yes", "yes"),
        ("renderer", "renderer-default-0", "yes", "yes"),
    ]


def table_rows(screen: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("│").split("│")]
        for line in screen.splitlines()
        if line.strip().startswith("│")
    ]


def on_screen(screen: str, row: tuple[str, ...]) -> bool:
    return any(tuple(cells[: len(row)]) == row for cells in table_rows(screen))


def class_row(screen: str, priority: str) -> list[str]:
    return next(cells for cells in table_rows(screen) if cells[0] == priority)


def wait_for_screen(screen, rows: list[tuple[str, ...]], heading: str) -> str:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + SCREEN_TIMEOUT_S
    text = ""
    while time.monotonic() < deadline:
        text = screen()
        if heading in text and all(on_screen(text, row) for row in rows):
            return text
        time.sleep(0.5)
    missing = [row for row in rows if not on_screen(text, row)]
    pytest.fail(f"not on the screen: {missing} (heading {heading!r})\n{text}")


def test_top_live_through_prometheus(prometheus: Settings, tmux):
    start, screen = tmux
    pipeline = unique("top")
    window_s = 5.0
    with contract_exporter(prometheus, pipeline):
        argv = [
            sys.executable,
            "-m",
            "aigc",
            "top",
            "--pipeline",
            pipeline,
            "--window",
            f"{window_s}",
        ]
        start(shlex.join(argv), aigc_env(prometheus, prometheus.infra.prometheus_port))
        text = wait_for_screen(screen, expected_rows(pipeline), f"pipeline {pipeline}")
        assert "Prometheus at http://127.0.0.1" in text
        # LOW's lag is the stand-in's 40.
        assert class_row(text, "LOW")[3] == str(LAG["LOW"])
        first = screen()
        # Once the rate window lies wholly after Prometheus's first scrape of the stand-in (before the rows
        # above showed), HIGH is admitted at about 10/s (one per 0.1 s tick); a window reaching back before
        # that scrape counts everything since the stand-in started (a new series counts from zero).
        time.sleep(window_s + 1.5)
        text = screen()
        assert text != first, "the view did not refresh"
    admitted = float(class_row(text, "HIGH")[1])
    assert 5 <= admitted <= 15, text


def test_top_once_reads_the_stages_without_prometheus(prometheus: Settings, tmp_path: Path, tmux):
    start, screen = tmux
    pipeline = unique("top")
    nobody = prometheus.infra.prometheus_port + 7  # no Prometheus listens there
    with contract_exporter(prometheus, pipeline):
        argv = [sys.executable, "-m", "aigc", "top", "--once", "--pipeline", pipeline]
        start(f"{shlex.join(argv)}; sleep 60", aigc_env(prometheus, nobody))
        text = wait_for_screen(screen, expected_rows(pipeline), f"pipeline {pipeline}")
    assert "scraping the stages" in text
    assert class_row(text, "NORMAL")[3] == str(LAG["NORMAL"])
    assert class_row(text, "NORMAL")[4] == str(LAG["NORMAL"])  # the share group's backlog
