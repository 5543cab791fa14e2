"""`aigc up | status | down`: the local infrastructure and the pipeline as a background service.

`up` starts Kafka, Cassandra and S3Proxy (`aigc infra up`, detached), creates the topics, tables and
buckets, builds the tiny model if the registry points at a missing one, then starts `aigc run` (the
stage supervisor) in its own session so it outlives the command, and waits until every stage is
ready. Everything of the pipeline lives under ``<run dir>/pipeline/``: ``supervisor.pid``,
``stages.json`` (what the supervisor says each stage is doing), ``supervisor.log`` and one log per
stage. `status` answers from those files and the services' own readiness checks. `down` stops the
stages first (SIGTERM to the supervisor, which stops them within its grace period), then the services.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from infra.bootstrap import bootstrap
from infra.launcher import cmdline, log_tail
from infra.launcher import down as infra_down
from infra.launcher import status as infra_status
from infra.launcher import up as infra_up
from plumbing.settings import Settings
from plumbing.supervisor import STOP_GRACE_S
from producers.demo import ensure_models

READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = STOP_GRACE_S + 15.0  # the supervisor's own grace for its stages, and its exit


class ServiceError(RuntimeError):
    """The pipeline could not be started or stopped; the message says why and where the logs are."""


@dataclass(frozen=True)
class StageState:
    """A stage as `aigc status` shows it: its process, whether it is ready, and a note on why not."""

    name: str
    pid: int | None
    ready: bool
    note: str


@dataclass(frozen=True)
class PipelinePaths:
    """Where the background pipeline keeps its pid, its stages' state and its logs."""

    dir: Path

    @classmethod
    def of(cls, settings: Settings) -> PipelinePaths:
        """The paths of the pipeline of ``settings``' run directory."""
        return cls(settings.infra.run_dir.resolve() / "pipeline")

    @property
    def pid_file(self) -> Path:
        """The supervisor's pid."""
        return self.dir / "supervisor.pid"

    @property
    def state_file(self) -> Path:
        """What the supervisor says each stage is doing (JSON)."""
        return self.dir / "stages.json"

    @property
    def log(self) -> Path:
        """The supervisor's own log."""
        return self.dir / "supervisor.log"


def supervisor_pid(paths: PipelinePaths) -> int | None:
    """The background supervisor's pid if it is alive and is the one started for this run directory."""
    try:
        pid = int(paths.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    args = cmdline(pid)
    return pid if "run" in args and str(paths.state_file) in args else None


def start_pipeline(
    settings: Settings,
    renderers: int = 1,
    synthetic_ms: float | None = None,
    echo: Callable[[str], None] = print,
    timeout_s: float = READY_TIMEOUT_S,
) -> int:
    """Start the stage supervisor in the background (unless running) and wait until every stage is ready."""
    paths = PipelinePaths.of(settings)
    pid = supervisor_pid(paths)
    proc: subprocess.Popen[bytes] | None = None
    if pid is not None:
        echo(f"pipeline: already running (supervisor pid {pid})")
    else:
        paths.dir.mkdir(parents=True, exist_ok=True)
        paths.state_file.unlink(missing_ok=True)
        command = [sys.executable, "-m", "aigc", "run", "--renderers", str(renderers),
                   "--log-dir", str(paths.dir), "--state-file", str(paths.state_file)]  # fmt: skip
        if synthetic_ms is not None:
            command += ["--synthetic-ms", str(synthetic_ms)]
        with paths.log.open("ab") as log:
            proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"},
                start_new_session=True,  # its own session: it outlives this command and its terminal
            )
        pid = proc.pid
        paths.pid_file.write_text(f"{pid}\n")
        echo(f"pipeline: started (supervisor pid {pid}, logs in {paths.dir})")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # Our own child is asked directly: until it has exec'd, its command line is still ours.
        if (proc.poll() is not None) if proc is not None else supervisor_pid(paths) is None:
            raise ServiceError(f"the supervisor exited; last lines of {paths.log}:\n{log_tail(paths.log)}")
        stages = stage_status(settings)
        if stages and all(s.ready for s in stages):
            echo(f"pipeline: ready ({len(stages)} stages)")
            return pid
        time.sleep(0.5)
    raise ServiceError(f"the pipeline was not ready in {timeout_s:.0f} s; stage logs are in {paths.dir}")


def stage_status(settings: Settings) -> list[StageState]:
    """What each stage of the background pipeline is doing; empty when it is not running."""
    paths = PipelinePaths.of(settings)
    if supervisor_pid(paths) is None:
        return []
    try:
        state = json.loads(paths.state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # the supervisor has not written it yet
    stages = []
    for name, stage in state.get("stages", {}).items():
        alive = stage["alive"] and Path(f"/proc/{stage['pid']}").exists()
        note = "ready" if stage["ready"] and alive else ("starting" if alive else "exited, restarting")
        if alive and not stage["ready"] and stage.get("unmet"):
            note += f" (waiting for {', '.join(stage['unmet'])})"
        if stage["restarts"]:
            note += f" ({stage['restarts']} restart(s))"
        stages.append(StageState(name, stage["pid"] if alive else None, bool(stage["ready"] and alive), note))
    return stages


def stop_pipeline(settings: Settings, echo: Callable[[str], None] = print) -> bool:
    """SIGTERM the background supervisor and wait for it (it stops its stages); True if it was running."""
    paths = PipelinePaths.of(settings)
    pid = supervisor_pid(paths)
    if pid is None:
        paths.pid_file.unlink(missing_ok=True)
        return False
    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    while supervisor_pid(paths) is not None and time.monotonic() - started < STOP_TIMEOUT_S:
        time.sleep(0.2)
    if supervisor_pid(paths) is not None:
        echo(f"pipeline: the supervisor did not stop in {STOP_TIMEOUT_S:.0f} s; killing it (pid {pid})")
        os.kill(pid, signal.SIGKILL)  # its stages get SIGTERM as it dies (PR_SET_PDEATHSIG)
    paths.pid_file.unlink(missing_ok=True)
    echo(f"pipeline: stopped in {time.monotonic() - started:.1f} s")
    return True


def up(settings: Settings, renderers: int = 1, synthetic_ms: float | None = None) -> int:
    """`aigc up`: services, topics and tables, models, then the stages in the background."""
    infra_up(settings)
    bootstrap(settings)
    if synthetic_ms is None:
        ensure_models(settings)
    start_pipeline(settings, renderers, synthetic_ms)
    print(
        "\nsubmit with `.venv/bin/aigc submit 'a prompt' --wait`; `.venv/bin/aigc status` says what "
        "runs; `.venv/bin/aigc down` stops it all"
    )
    if settings.gateway.enabled:
        gw = settings.gateway
        print(
            f"HTTP API and console: http://{gw.host}:{gw.port}/console/ (API docs at /docs; "
            "`.venv/bin/aigc keys create TENANT` makes a key)"
        )
    return 0


def status(settings: Settings) -> int:
    """`aigc status`: one line per service and stage; 0 when everything is ready, 1 otherwise."""
    ok = True
    for s in infra_status(settings):
        state = "ready" if s.ready else ("running" if s.running else "down")
        ok &= s.ready
        print(f"{s.name:<22} {state:<8} port {s.ports[0]}" + (f", pid {s.pid}" if s.pid else ""))
    paths = PipelinePaths.of(settings)
    stages = stage_status(settings)
    pid = supervisor_pid(paths)
    if pid is None:
        print(f"{'pipeline':<22} {'down':<8} (not running; `aigc up` starts it)")
        return 1
    print(f"{'pipeline':<22} {'running':<8} supervisor pid {pid}, logs in {paths.dir}")
    for stage in stages:
        ok &= stage.ready
        print(f"  {stage.name:<20} {stage.note}" + (f", pid {stage.pid}" if stage.pid else ""))
    return 0 if ok and stages else 1


def down(settings: Settings) -> int:
    """`aigc down`: the stages first, then the services."""
    if not stop_pipeline(settings):
        print("pipeline: not running")
    infra_down(settings)
    return 0
