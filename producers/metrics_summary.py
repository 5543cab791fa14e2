"""What each stage counted over a period, read back from Prometheus: the end of `make demo`.

Counters are compared between Prometheus's view at ``start`` and at ``end`` (a series born in between
counts from zero, so a demo's first request is not lost the way rate() would lose it). Call it after the
last completion, with the pipeline still running::

    from producers.metrics_summary import print_summary
    print_summary(settings, start_s=submitted_at - 1, end_s=time.time())
"""

from __future__ import annotations

import time
from collections.abc import Callable

from infra.prometheus_server import prometheus_url
from infra.promql import PromClient, PromError
from plumbing.settings import Settings
from producers.metrics_view import Snapshot, increase_by, mean_by, prometheus_snapshot

FRESH_TIMEOUT_S = 10.0  # a scrape after the end must land before the end's numbers are read


def _counts(values: dict[tuple[str, ...], float]) -> str:
    parts = [f"{v:.0f} {'/'.join(k) or 'total'}" for k, v in sorted(values.items()) if v]
    return ", ".join(parts) or "none"


def summary_lines(old: Snapshot, new: Snapshot) -> list[str]:
    """One line per stage: what it did between the two snapshots."""
    decisions = increase_by(old, new, "aigc_gatekeeper_requests_total", ("decision",))
    tasks = increase_by(old, new, "aigc_renderer_tasks_total", ("outcome",))
    batches = increase_by(old, new, "aigc_renderer_batch_size_count", ())
    batch_mean = mean_by(old, new, "aigc_renderer_batch_size", ())
    wait = mean_by(old, new, "aigc_renderer_queue_wait_seconds", ())
    frames = increase_by(old, new, "aigc_assembler_frames_total", ())
    completions = increase_by(old, new, "aigc_completions_total", ("status",))
    e2e = mean_by(old, new, "aigc_request_e2e_seconds", ())
    dead = increase_by(old, new, "aigc_dead_letters_total", ("stage",))
    renderer = f"render tasks {_counts(tasks)}; batches {sum(batches.values()):.0f}"
    if () in batch_mean:
        renderer += f" (mean size {batch_mean[()]:.1f})"
    if () in wait:
        renderer += f"; mean queue wait {wait[()]:.2f} s"
    assembler = f"frames {sum(frames.values()):.0f}; completions {_counts(completions)}"
    if () in e2e:
        assembler += f"; mean end-to-end {e2e[()]:.2f} s"
    return [
        f"{'gatekeeper':<13}requests {_counts(decisions)}",
        f"{'renderer':<13}{renderer}",
        f"{'assembler':<13}{assembler}",
        f"{'dead letters':<13}{_counts(dead)}",
    ]


def read_summary(
    settings: Settings, start_s: float, end_s: float | None = None, pipeline: str | None = None
) -> list[str]:
    """The stages' counts of ``pipeline`` (default: the topic prefix) between epoch ``start_s`` and
    ``end_s`` (default now), once Prometheus has scraped every target after ``end_s``."""
    client = PromClient(prometheus_url(settings))
    pipeline = pipeline or settings.kafka.topic_prefix
    end_s = time.time() if end_s is None else end_s
    deadline = time.monotonic() + FRESH_TIMEOUT_S
    selector = f'up{{job="aigc", pipeline="{pipeline}"}}'
    while time.monotonic() < deadline:
        stamps = client.query(f"timestamp({selector})")
        if stamps and min(s.value for s in stamps) > end_s:
            break
        time.sleep(0.5)
    else:
        raise PromError(f"Prometheus at {client.url} has not scraped pipeline {pipeline} since the end")
    read_at = time.time()
    return summary_lines(
        prometheus_snapshot(client, pipeline, start_s), prometheus_snapshot(client, pipeline, read_at)
    )


def print_summary(
    settings: Settings,
    start_s: float,
    end_s: float | None = None,
    pipeline: str | None = None,
    echo: Callable[[str], None] = print,
) -> bool:
    """`read_summary` printed under a heading; a missing Prometheus is one line, not a failure (False)."""
    try:
        lines = read_summary(settings, start_s, end_s, pipeline)
    except PromError as exc:
        echo(f"(no metrics summary: {exc})")
        return False
    echo(f"\n== metrics read back from Prometheus ({prometheus_url(settings)})")
    for line in lines:
        echo(f"  {line}")
    return True
