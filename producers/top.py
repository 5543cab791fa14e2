"""`aigc top`: a live terminal view of one pipeline from its stages' metrics, refreshed every second.

Per priority class: requests admitted and completed per second, the backlog (consumer lag, or a share
group's unacknowledged records), queue wait and end-to-end p99; per renderer: busy fraction, mean batch size
and tasks per second; rejections by reason; dead letters by stage; each stage's up and ready. It reads the
local Prometheus's HTTP API and falls back to scraping the stages listed in the file-SD JSON when Prometheus
is not running (producers/metrics_view.py). ``--once`` prints one frame and exits (scripts, tests).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from plumbing.settings import Settings
from producers.metrics_view import (
    PRIORITIES,
    Snapshot,
    Source,
    gauge_by,
    increase_by,
    mean_by,
    quantile_by,
)


@dataclass(frozen=True)
class Frame:
    """The figures of one refresh, computed from two snapshots ``window_s`` apart."""

    title: str
    old: Snapshot | None
    new: Snapshot

    @property
    def window_s(self) -> float:
        """Seconds between the two snapshots (NaN without an earlier one)."""
        return max(self.new.at - self.old.at, 1e-9) if self.old is not None else math.nan

    def per_s(self, name: str, by: tuple[str, ...], **match: str) -> dict[tuple[str, ...], float]:
        """Rate of counter ``name`` over the window, by the label names ``by``, of the series whose labels
        equal ``match``."""

        def where(labels: dict[str, str]) -> bool:
            return all(labels.get(k) == v for k, v in match.items())

        return {k: v / self.window_s for k, v in increase_by(self.old, self.new, name, by, where).items()}


def _seconds(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _rate(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def classes_table(frame: Frame) -> Table:
    """Per priority class: admitted and completed per second, lag, backlog, queue wait and end-to-end p99."""
    admitted = frame.per_s("aigc_gatekeeper_requests_total", ("priority",), decision="accepted")
    completed = frame.per_s("aigc_completions_total", ("priority",))
    backlog = gauge_by(frame.new, "aigc_share_group_backlog_messages", ("priority",))
    lag = gauge_by(frame.new, "aigc_consumer_lag_messages", ("priority",))
    wait = quantile_by(frame.old, frame.new, "aigc_renderer_queue_wait_seconds", 0.99, ("priority",))
    e2e = quantile_by(frame.old, frame.new, "aigc_request_e2e_seconds", 0.99, ("priority",))
    table = Table(title="classes", title_justify="left", expand=False)
    for column in ("class", "admitted/s", "completed/s", "lag", "backlog", "queue wait p99", "e2e p99"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for priority in PRIORITIES:
        k = (priority,)
        table.add_row(
            priority,
            _rate(admitted.get(k, 0.0)),
            _rate(completed.get(k, 0.0)),
            _count(lag.get(k)),
            _count(backlog.get(k)),
            _seconds(wait.get(k)),
            _seconds(e2e.get(k)),
        )
    return table


def renderers_table(frame: Frame) -> Table:
    """Per renderer: busy share, mean batch size and tasks per second."""
    busy = gauge_by(frame.new, "aigc_renderer_busy_ratio", ("instance_name",))
    batch = mean_by(frame.old, frame.new, "aigc_renderer_batch_size", ("instance_name",))
    tasks = frame.per_s("aigc_renderer_tasks_total", ("instance_name",))
    table = Table(title="renderers", title_justify="left")
    for column in ("renderer", "busy", "batch size", "tasks/s"):
        table.add_column(column, justify="left" if column == "renderer" else "right")
    for (name,) in sorted(busy):
        mean = batch.get((name,))
        table.add_row(
            name,
            f"{busy[(name,)] * 100:.0f}%",
            "-" if mean is None else f"{mean:.1f}",
            _rate(tasks.get((name,), 0.0)),
        )
    return table


def failures_table(frame: Frame) -> Table:
    """Rejections by reason and dead letters by stage and reason: totals, and rejections per second."""
    totals = increase_by(None, frame.new, "aigc_gatekeeper_requests_total", ("reason",),
                         lambda labels: labels.get("decision") == "rejected")  # fmt: skip
    rates = frame.per_s("aigc_gatekeeper_requests_total", ("reason",), decision="rejected")
    dead = increase_by(None, frame.new, "aigc_dead_letters_total", ("stage", "reason"))
    table = Table(title="rejections and dead letters", title_justify="left")
    for column in ("what", "reason", "total", "per s"):
        table.add_column(column, justify="left" if column in ("what", "reason") else "right")
    for (reason,), total in sorted(totals.items()):
        table.add_row("rejected", reason or "-", _count(total), _rate(rates.get((reason,), 0.0)))
    for (stage, reason), total in sorted(dead.items()):
        table.add_row(f"DLQ {stage}", reason or "-", _count(total), "")
    if not totals and not dead:
        table.add_row("none", "", "0", "")
    return table


def stages_table(frame: Frame) -> Table:
    """Per stage process: whether it is up (scraped) and ready."""
    up = gauge_by(frame.new, "up", ("stage", "instance_name"), min)
    ready = gauge_by(frame.new, "aigc_stage_ready", ("stage", "instance_name"), min)
    table = Table(title="stages", title_justify="left")
    for column in ("stage", "process", "up", "ready"):
        table.add_column(column)
    for stage, name in sorted(up):
        is_ready = ready.get((stage, name))
        table.add_row(
            stage,
            name,
            "yes" if up[(stage, name)] else "NO",
            "-" if is_ready is None else ("yes" if is_ready else "NO"),
        )
    return table


def render(frame: Frame) -> Group:
    """One refresh of `aigc top`: the heading and the four tables."""
    heading = Text(frame.title, style="bold")
    return Group(heading, classes_table(frame), renderers_table(frame), failures_table(frame),
                 stages_table(frame))  # fmt: skip


def frame(source: Source, window_s: float) -> Frame:
    """The figures of now, over about the last ``window_s`` seconds of ``source``."""
    old, new = source.pair(window_s)
    stamp = time.strftime("%H:%M:%S", time.localtime(new.at))
    window = f"rates over {new.at - old.at:.0f} s" if old is not None else "totals"
    title = f"aigc top - pipeline {source.pipeline} - {stamp} - {window} - {source.describe()}"
    return Frame(title, old, new)


def run_top(
    settings: Settings,
    *,
    pipeline: str | None = None,
    prometheus: str | None = None,
    once: bool = False,
    interval_s: float = 1.0,
    window_s: float = 10.0,
    console: Console | None = None,
) -> int:
    """Show `aigc top` on ``console``: one frame with ``once``, else a frame every ``interval_s`` until
    Ctrl-C."""
    source = Source(settings, pipeline or settings.kafka.topic_prefix, prometheus)
    console = console or Console()
    if once:
        console.print(render(frame(source, window_s)))
        return 0
    with Live(render(frame(source, window_s)), console=console, auto_refresh=False, screen=False) as live:
        while True:
            time.sleep(interval_s)
            live.update(render(frame(source, window_s)), refresh=True)
