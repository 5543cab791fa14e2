"""One way to start a pipeline in-process: `running_pipeline`, used by the demo, the benchmarks, the chaos
harness and the end-to-end tests.

It creates the topics, keyspace and buckets (`infra.bootstrap`), starts the stages (`pipeline_stages`)
as child processes under a `Supervisor`, returns once every stage says it is ready, and always stops
them on the way out. With ``isolate`` the run gets a topic prefix, keyspace and gatekeeper app id of its
own, so it starts with empty topics and shares only the services; with ``drop`` as well, those topics
and that keyspace are deleted once the stages have stopped (a benchmark run otherwise leaves hundreds of
partitions on the broker). `aigc run` / `aigc up` start the same stages as a long-running service
instead (`plumbing.supervisor.run_pipeline`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from infra.bootstrap import bootstrap, teardown
from plumbing.settings import Settings
from plumbing.supervisor import MAX_BACKOFF_S, Supervisor, pipeline_stages, targets_path

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 300.0
_NAME = re.compile(r"[a-z][a-z0-9]{0,24}")


class PipelineNotReady(RuntimeError):
    """A stage did not become ready in time; the message names the stages and where their logs are."""


@dataclass(frozen=True)
class RunningPipeline:
    """A started pipeline: the settings its stages run with, and their supervisor (to kill or restart a
    stage, or poll it while waiting)."""

    settings: Settings
    supervisor: Supervisor

    @property
    def log_dir(self) -> Path:
        """The folder of the stages' logs."""
        return self.supervisor.log_dir


def isolated(settings: Settings, name: str) -> Settings:
    """``settings`` with a topic prefix, keyspace and gatekeeper app id of their own: ``<name><tag>``,
    ``<name>_<tag>`` and ``<name>-<tag>-gatekeeper`` for a fresh random tag."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"isolate: {name!r} is not a short lowercase name ([a-z][a-z0-9]*, at most 25)")
    tag = uuid.uuid4().hex[:8]
    return settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(update={"topic_prefix": f"{name}{tag}"}),
            "cassandra": settings.cassandra.model_copy(update={"keyspace": f"{name}_{tag}"}),
            "gatekeeper": settings.gatekeeper.model_copy(update={"app_id": f"{name}-{tag}-gatekeeper"}),
        }
    )


@contextlib.contextmanager
def running_pipeline(
    settings: Settings,
    *,
    renderers: int = 1,
    synthetic_ms: float | None = None,
    isolate: str | None = None,
    drop: bool = False,
    renderer_env: Mapping[str, str] | None = None,
    echo: Callable[[str], None] = print,
    max_backoff_s: float = MAX_BACKOFF_S,
    webhooks: bool = False,
    gateway: bool = False,
    replicas: int = 1,
) -> Iterator[RunningPipeline]:
    """The pipeline's stages, started and ready; stopped when the block ends, however it ends.

    ``renderers`` per pool, rendering with the synthetic backend when ``synthetic_ms`` is given.
    ``isolate`` names a run of its own (see `isolated`); its logs go to ``<home>/logs/<topic prefix>``,
    otherwise to ``<home>/logs``. ``drop`` deletes the isolated run's topics and keyspace at the end.
    ``renderer_env`` is settings (``AIGC_...`` variables) for the renderers only, on top of the shared
    ones. ``echo`` gets the supervisor's lines (started, ready, crashed, restarted) and one line for
    bootstrap. ``webhooks`` adds the webhook delivery stage (the demo and the webhook tests; other runs
    leave it out, whatever ``webhooks.enabled`` says). ``gateway`` adds the HTTP gateway stage (on
    ``gateway.port``; off unless asked, so a run that does not need it starts no extra process).
    ``replicas``: how many of each other stage (see `pipeline_stages`). Raises
    `PipelineNotReady` when a stage is not ready within `READY_TIMEOUT_S`.
    """
    if drop and isolate is None:
        raise ValueError("drop deletes a run's own topics and keyspace: it needs isolate")
    if isolate is not None:
        settings = isolated(settings, isolate)
    stages = pipeline_stages(
        settings, renderers, synthetic_ms, webhooks=webhooks, gateway=gateway, replicas=replicas
    )
    if renderer_env:
        stages = [
            dataclasses.replace(s, env={**s.env, **renderer_env}) if s.verb[0] == "render" else s
            for s in stages
        ]
    log_dir = settings.home / "logs"
    if isolate is not None:
        log_dir /= settings.kafka.topic_prefix
    supervisor = Supervisor(
        stages,
        settings.to_env(),
        log_dir,
        echo=echo,
        max_backoff_s=max_backoff_s,
        targets=targets_path(settings),  # Prometheus finds the run's stages here
        pipeline=settings.kafka.topic_prefix,
    )
    try:
        changes = bootstrap(settings, echo=lambda _: None)
        echo(f"bootstrap: {len(changes)} change(s)")
        supervisor.start()
        if not supervisor.wait_ready(READY_TIMEOUT_S):
            waiting = [name for name, s in supervisor.snapshot().items() if not s["ready"]]
            raise PipelineNotReady(
                f"the pipeline was not ready in {READY_TIMEOUT_S:.0f} s ({', '.join(waiting)} not ready); "
                f"logs in {log_dir}"
            )
        yield RunningPipeline(settings, supervisor)
    finally:
        if supervisor.children:
            echo("stopping the stages")
        supervisor.stop()
        if drop:
            try:
                teardown(settings, echo=lambda _: None)
            except Exception:  # what a run found must not be lost to its clean-up: say so, go on
                log.warning("could not drop the run %s", settings.kafka.topic_prefix, exc_info=True)
