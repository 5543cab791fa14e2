"""The operator's view behind the console's operator page, for keys created with ``--operator``.

``GET /v1/ops/overview``: backlog (lag) and queue wait p99 per class from Prometheus's recorded rules
(empty, with the reason, when Prometheus is not running), each stage of this pipeline and what its
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

from infra.prometheus_server import prometheus_url
from infra.promql import PromClient, PromError
from producers.dlq import Filters, count, read_dead_letters, replay
from producers.gateway.backend import Backend
from producers.gateway.keys import ApiKey
from producers.gateway.problems import Problem
from producers.metrics_view import read_targets

QUERIES = {
    "backlog_messages": "sum by (priority) (priority:aigc_backlog_messages:sum{{pipeline={p!r}}})",
    "queue_wait_p99_s": "max by (priority) "
    "(priority:aigc_renderer_queue_wait_seconds:p99_1m{{pipeline={p!r}}})",
}


def _probe(address: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://{address}/readyz", timeout=1.0) as resp:
            return {"ready": True, **json.load(resp)}
    except urllib.error.HTTPError as exc:
        return {"ready": False, **json.load(exc)}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return {"ready": False, "error": str(exc)[:200]}


def overview(backend: Backend) -> dict[str, Any]:
    settings = backend.settings
    pipeline = settings.kafka.topic_prefix
    classes: dict[str, dict[str, float]] = {}
    prometheus: dict[str, Any] = {"url": prometheus_url(settings), "error": None}
    try:
        client = PromClient(prometheus_url(settings), timeout_s=2.0)
        for name, expr in QUERIES.items():
            for sample in client.query(expr.format(p=pipeline).replace("'", '"')):
                classes.setdefault(sample.labels.get("priority", "?"), {})[name] = sample.value
    except PromError as exc:
        prometheus["error"] = str(exc)
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
        "prometheus": prometheus,
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
