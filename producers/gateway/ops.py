"""The operator's view behind the console's operator page, for keys created with ``--operator``.

``GET /v1/ops/overview``: consumer lag, share-group backlog and queue wait p99 per class, read as
`aigc top` reads them (`producers.metrics_view.Source`: Prometheus, or the stages' own /metrics when
Prometheus is not running or does not scrape this pipeline), each stage of this pipeline and what its
``/readyz`` answers (from the Prometheus file-SD targets the supervisor keeps), and dead letters counted
by stage and reason (`producers.dlq`). ``POST /v1/ops/dlq/replay-dry-run``: what `aigc dlq replay`
would do, nothing sent.
"""

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI

from infra.promql import PromError
from plumbing.observability import PRIORITY_LABELS
from producers.dlq import Filters, count, read_dead_letters, replay
from producers.gateway.backend import Backend
from producers.gateway.keys import ApiKey
from producers.gateway.problems import Problem
from producers.metrics_view import Source, gauge_by, quantile_by, read_targets, scrape_snapshot

WINDOW_S = 60.0  # queue wait p99 over about the last minute


def _probe(address: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://{address}/readyz", timeout=1.0) as resp:
            return {"ready": True, **json.load(resp)}
    except urllib.error.HTTPError as exc:
        return {"ready": False, **json.load(exc)}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return {"ready": False, "error": str(exc)[:200]}


_sources: dict[int, Source] = {}  # one per gateway: it keeps the earlier scrapes a window needs


def overview(backend: Backend) -> dict[str, Any]:
    """The operator page's figures: lag, backlog and queue wait p99 per class, each stage's readiness and
    the dead letters counted by stage and reason."""
    settings = backend.settings
    pipeline = settings.kafka.topic_prefix
    source = _sources.setdefault(id(backend), Source(settings, pipeline))
    classes: dict[str, dict[str, float]] = {}
    try:
        old, new = source.pair(WINDOW_S)
        if not new.values("aigc_stage_ready"):  # a Prometheus that does not scrape this run: ask the stages
            old, new = None, scrape_snapshot(read_targets(settings, pipeline))
        figures = {
            "lag_messages": gauge_by(new, "aigc_consumer_lag_messages", ("priority",)),
            "backlog_messages": gauge_by(new, "aigc_share_group_backlog_messages", ("priority",)),
            "queue_wait_p99_s": quantile_by(
                old, new, "aigc_renderer_queue_wait_seconds", 0.99, ("priority",)
            ),
        }
        for name, by_class in figures.items():
            for (priority,), value in by_class.items():
                if priority in PRIORITY_LABELS:  # lag of the groups that serve no one class has none
                    classes.setdefault(priority, {})[name] = value
        metrics = {"source": source.describe(), "error": None}
    except PromError as exc:
        metrics = {"source": source.describe(), "error": str(exc)}
    stages = []
    for target in read_targets(settings, pipeline):
        stages.append(
            {
                "stage": target.labels.get("instance_name", target.labels.get("stage", "?")),
                "address": target.address,
                **_probe(target.address),
            }
        )
    counts = count(read_dead_letters(settings, Filters(), timeout_s=5.0))
    return {
        "pipeline": pipeline,
        "metrics": metrics,
        "classes": classes,
        "stages": sorted(stages, key=lambda s: s["stage"]),
        "dead_letters": {
            "total": counts.total,
            "by_stage_reason": [
                {"stage": s, "kind": k, "code": c, "count": n}
                for (s, k, c), n in sorted(counts.by_stage_reason.items())
            ],
        },
    }


def add_ops_routes(app: FastAPI, backend: Backend, tenant_key: Callable[..., Awaitable[ApiKey]]) -> None:
    """Add the /v1/ops routes (operator keys only) to ``app``."""

    def operator(key: Annotated[ApiKey, Depends(tenant_key)]) -> ApiKey:
        if not key.operator:
            raise Problem(
                403, "Operator key required", "create one with `aigc keys create TENANT --operator`"
            )
        return key

    Operator = Annotated[ApiKey, Depends(operator)]

    @app.get("/v1/ops/overview")
    async def ops_overview(_: Operator) -> dict[str, Any]:
        """Lag and queue wait per class, stage health, dead-letter counts."""
        return await asyncio.to_thread(overview, backend)

    @app.post("/v1/ops/dlq/replay-dry-run")
    async def replay_dry_run(_: Operator, stage: str | None = None) -> dict[str, Any]:
        """What replaying the dead letters (of ``stage``) would do; nothing is sent."""
        filters = Filters(stages=(stage,) if stage else ())
        report = await asyncio.to_thread(replay, backend.settings, filters, False, 50.0, 5.0)
        return {"summary": report.summary(), "actions": [a._asdict() for a in report.actions[:200]]}
