"""`aigc run`: the pipeline's stages as separate processes under one supervisor.

Each stage is a child process running an ``aigc`` verb (gatekeeper, render, assemble, relay,
lag-exporter), with its output in ``<home>/logs/<stage>.log`` and its settings passed through the
environment. Each gets a free loopback port of its own (``AIGC_METRICS_PORT``, kept across restarts) for
``/metrics``, ``/healthz`` and ``/readyz`` (plumbing/observability.py). The supervisor reports each stage
ready once its ``/readyz`` answers 200 (and asks again every few seconds, for `aigc status`), reports a
stage that crashes with its exit code and the tail of its log, and restarts it after a growing back-off.

With a targets file, the supervisor keeps Prometheus's file-based service discovery current: one entry
per running stage process (``{"targets": ["127.0.0.1:PORT"], "labels": {"stage", "instance_name",
"pipeline"}}``), written atomically whenever a process starts or stops, and the file removed when the
pipeline stops. Stopping (Ctrl-C or
SIGTERM) asks every stage to finish its work in hand (SIGTERM), then kills what is left after a grace
period. Children die with the supervisor even when it is killed outright (PR_SET_PDEATHSIG).

With a state file (`aigc up` runs `aigc run` in the background with one), the supervisor writes what
each stage is doing (pid, ready, restarts) there whenever it changes, so `aigc status` can answer
from another process.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from plumbing.backoff import Backoff
from plumbing.settings import Settings

STOP_GRACE_S = 30.0
RESTART_FIRST_S = 0.5  # the wait before a crashed stage's first restart; it doubles with each restart after
MAX_BACKOFF_S = 30.0
STABLE_S = 60.0  # a stage up this long before it died starts its back-off afresh
READY_RECHECK_S = 2.0  # how often a ready stage's /readyz is asked again
PROBE_TIMEOUT_S = 0.5
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class StageSpec:
    """One stage process: its ``aigc`` verb, its kind of stage, and settings of its own."""

    name: str
    verb: list[str]  # arguments after `aigc`
    stage: str  # gatekeeper, renderer, assembler, relay, lag_exporter: the `stage` label of its metrics
    env: dict[str, str] = field(default_factory=dict)  # this process's own settings on top of the shared ones


@dataclass
class _Child:
    spec: StageSpec
    proc: subprocess.Popen[bytes]
    log: Path
    started: float
    port: int
    ready_at: float | None = None
    ready: bool = False  # what /readyz said last
    checked_at: float = 0.0
    unmet: list[str] = field(default_factory=list)
    restarts: int = 0
    next_start: float = 0.0
    log_offset: int = field(default=0)


def pipeline_stages(
    settings: Settings,
    renderers: int,
    synthetic_ms: float | None = None,
    webhooks: bool | None = None,
    gateway: bool = False,
    replicas: int = 1,
) -> list[StageSpec]:
    """The stages: ``replicas`` gatekeepers, ``renderers`` renderers per pool, ``replicas`` assemblers and
    retry relays and, unless metrics are off (``observability.metrics=false``, to measure their cost), one
    lag exporter; ``replicas`` webhook delivery stages when ``webhooks`` says so (None:
    ``webhooks.enabled``); and, with ``gateway`` (and ``gateway.enabled``), the HTTP gateway.

    Replicas share nothing but the settings: each joins its stage's consumer group (the assemblers each
    with a transactional.id of their own, ``assembler.instance``), as processes on other hosts would. The
    first of a stage keeps the stage's name, the others are ``<stage>-1``, ``<stage>-2``..."""

    def replicated(name: str, verb: list[str], stage: str) -> list[StageSpec]:
        return [
            StageSpec(f"{name}-{i}" if i else name, verb, stage, _replica_env(stage, i))
            for i in range(replicas)
        ]

    stages = replicated("gatekeeper", ["gatekeeper"], "gatekeeper")
    for pool in settings.pools:
        verb = ["render", "--pool", pool]
        if synthetic_ms is not None:
            verb += ["--synthetic-ms", str(synthetic_ms)]
        stages += [StageSpec(f"renderer-{pool}-{i}", verb, "renderer") for i in range(renderers)]
    stages += replicated("assembler", ["assemble"], "assembler")
    stages += replicated("relay", ["relay"], "relay")
    if settings.observability.metrics:
        stages.append(StageSpec("lag-exporter", ["lag-exporter"], "lag_exporter"))
    if settings.webhooks.enabled if webhooks is None else webhooks:
        stages += replicated("webhooks", ["webhooks", "deliver"], "webhooks")
    if gateway and settings.gateway.enabled:
        stages.append(StageSpec("gateway", ["gateway"], "gateway"))
    # Each process keeps its identity across restarts (static group membership, see Settings.instance).
    return [dataclasses.replace(s, env={"AIGC_INSTANCE": s.name, **s.env}) for s in stages]


def _replica_env(stage: str, index: int) -> dict[str, str]:
    """Settings of replica ``index`` of ``stage``: an assembler's own transactional.id."""
    return {"AIGC_ASSEMBLER__INSTANCE": str(index)} if stage == "assembler" and index else {}


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_range(port_range: Path = EPHEMERAL_PORTS) -> tuple[int, int] | None:
    """The kernel's ephemeral port range (lowest, highest), from which it picks the local ports of outgoing
    connections and of bind(0); None where it cannot be read."""
    try:
        low, high = map(int, port_range.read_text().split())
    except (OSError, ValueError):
        return None
    return low, high


def _listen_ports() -> range:
    """Ports below the kernel's ephemeral range, which outgoing connections never take. A port the kernel
    hands out for bind(0) lies inside that range, so between our check and the stage's own bind an outgoing
    connection (a Kafka client's) can take it: a ``make test`` run lost its lag exporter to EADDRINUSE that
    way."""
    first = (ephemeral_range() or (32768, 60999))[0]
    return range(max(first - 12_000, 1024), first)


def free_port(preferred: int | None = None) -> int:
    """``preferred`` if it can be bound on loopback now, else a random free port below the ephemeral range
    (else one the kernel picks)."""
    ports = _listen_ports()
    candidates = random.sample(ports, min(20, len(ports)))
    for port in ([preferred] if preferred else []) + candidates + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As the stage's server binds (http.server sets SO_REUSEADDR): a port whose last connections
            # linger in TIME_WAIT after a crash is free for it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise OSError("no free loopback port")


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that `free_port` finds free now."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def probe_ready(port: int, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[bool, list[str]]:
    """Ask a stage's ``/readyz``: (ready, the conditions it says are unmet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=timeout_s) as response:
            return response.status == 200, []
    except urllib.error.HTTPError as exc:
        try:
            return False, list(json.loads(exc.read()).get("unmet", []))
        except (ValueError, OSError):  # OSError: the body did not come in time (a loaded machine)
            return False, [f"HTTP {exc.code}"]
    except (OSError, ValueError):
        return False, ["not answering"]


def targets_path(settings: Settings) -> Path:
    """The file-SD file of a pipeline: ``<home>/prometheus/targets/<topic_prefix>.json``."""
    return settings.home.resolve() / "prometheus" / "targets" / f"{settings.kafka.topic_prefix}.json"


class Supervisor:
    """The stage processes of one pipeline: starts them, reports and restarts the ones that die (after a
    growing back-off, unless ``restart`` is off), keeps the Prometheus targets file current, stops them.
    """

    def __init__(
        self,
        stages: list[StageSpec],
        env: Mapping[str, str],
        log_dir: Path,
        restart: bool = True,
        echo: Callable[[str], None] = print,
        max_backoff_s: float = MAX_BACKOFF_S,
        targets: Path | None = None,
        pipeline: str = "",
    ) -> None:
        self.stages = stages
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.log_dir = log_dir
        self.restart = restart
        self.echo = echo
        self.backoff = Backoff(first_s=RESTART_FIRST_S, max_s=max_backoff_s)
        self.targets = targets  # Prometheus file-SD file kept current, when given
        self.pipeline = pipeline
        self.children: dict[str, _Child] = {}
        self._targets_written: list[dict[str, object]] | None = None

    def _spawn(self, spec: StageSpec, restarts: int = 0, port: int | None = None) -> _Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{spec.name}.log"
        port = free_port(port)
        with log.open("ab") as out:
            offset = out.tell()
            proc = subprocess.Popen(
                [sys.executable, "-m", "aigc", *spec.verb],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**self.env, **spec.env, "AIGC_METRICS_PORT": str(port)},
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - prctl only, no locks
            )
        return _Child(spec, proc, log, time.monotonic(), port, restarts=restarts, log_offset=offset)

    def start(self) -> None:
        """Start every stage; each gets a port of its own for ``/metrics`` and ``/readyz``."""
        for spec in self.stages:
            child = self.children[spec.name] = self._spawn(spec)
            self.echo(
                f"{spec.name}: started (pid {child.proc.pid}, log {self.log_dir / spec.name}.log, "
                f"metrics http://127.0.0.1:{child.port}/metrics)"
            )
        self._write_targets()

    def _write_targets(self) -> None:
        """The file-SD entries of the running stage processes, written when they changed."""
        if self.targets is None:
            return
        entries: list[dict[str, object]] = [
            {
                "targets": [f"127.0.0.1:{c.port}"],
                "labels": {"stage": c.spec.stage, "instance_name": name, "pipeline": self.pipeline},
            }
            for name, c in self.children.items()
            if c.proc.poll() is None
        ]
        if entries != self._targets_written:
            self.targets.parent.mkdir(parents=True, exist_ok=True)
            write_state(self.targets, entries)
            self._targets_written = entries

    def _log_since_start(self, child: _Child) -> str:
        with child.log.open("rb") as fh:
            fh.seek(child.log_offset)
            return fh.read().decode("utf-8", "replace")

    def poll(self) -> None:
        """Notice stages that became ready or died; restart the dead after a back-off."""
        now = time.monotonic()
        for name, child in list(self.children.items()):
            code = child.proc.poll()
            if code is None:
                if not child.ready or now - child.checked_at >= READY_RECHECK_S:
                    child.ready, child.unmet = probe_ready(child.port)
                    child.checked_at = time.monotonic()
                if child.ready and child.ready_at is None:
                    child.ready_at = now
                    self.echo(f"{name}: ready after {now - child.started:.1f} s")
                continue
            if child.next_start == 0.0:
                tail = "\n".join(self._log_since_start(child).splitlines()[-15:])
                self.echo(f"{name}: exited with code {code}; last lines of {child.log}:\n{tail}")
                if not self.restart:
                    child.next_start = float("inf")
                    continue
                if now - child.started >= STABLE_S:
                    child.restarts = 0
                child.next_start = now + self.backoff.delay_s(child.restarts + 1)
            if now >= child.next_start:
                self.children[name] = self._spawn(child.spec, child.restarts + 1, child.port)
                self.echo(f"{name}: restarted (restart {child.restarts + 1})")
        self._write_targets()

    def wait_ready(self, timeout_s: float) -> bool:
        """Poll until every stage is ready; False when ``timeout_s`` passed first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll()
            if all(c.ready_at is not None for c in self.children.values()):
                return True
            time.sleep(0.2)
        return False

    def alive(self) -> list[str]:
        """The names of the stages whose process runs now."""
        return [name for name, c in self.children.items() if c.proc.poll() is None]

    def signal(self, name: str, sig: int) -> None:
        """Send ``sig`` to stage ``name``'s process."""
        self.children[name].proc.send_signal(sig)

    def stop(self, grace_s: float = STOP_GRACE_S) -> dict[str, int]:
        """SIGTERM every stage, wait for them, SIGKILL stragglers; returns the exit codes."""
        for child in self.children.values():
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        codes = {}
        for name, child in self.children.items():
            try:
                codes[name] = child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.echo(f"{name}: did not stop in {grace_s:.0f} s; killing it")
                child.proc.kill()
                codes[name] = child.proc.wait()
        if self.targets is not None:
            self.targets.unlink(missing_ok=True)
            self._targets_written = None
        return codes

    def snapshot(self) -> dict[str, dict[str, object]]:
        """Each stage's pid, whether it is alive and ready, and how often it was restarted."""
        return {
            name: {
                "pid": c.proc.pid,
                "alive": c.proc.poll() is None,
                "ready": c.ready and c.proc.poll() is None,
                "unmet": c.unmet,
                "restarts": c.restarts,
                "log": str(c.log),
                "metrics": f"http://127.0.0.1:{c.port}/metrics",
            }
            for name, c in self.children.items()
        }

    def run_until(self, stop: Callable[[], bool], state_file: Path | None = None) -> None:
        """Supervise until ``stop()`` says so, writing the stages' state to ``state_file`` when it changes."""
        written = None
        while not stop():
            self.poll()
            if state_file is not None and (state := self.snapshot()) != written:
                write_state(state_file, {"supervisor": os.getpid(), "stages": state})
                written = state
            time.sleep(0.2)


def write_state(path: Path, state: object) -> None:
    """Replace ``path`` with ``state`` as JSON in one rename, so a reader never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
    tmp.replace(path)


def run_pipeline(
    settings: Settings,
    renderers: int,
    synthetic_ms: float | None,
    restart: bool,
    log_dir: Path | None = None,
    state_file: Path | None = None,
) -> int:
    """`aigc run`: start the stages, supervise them until Ctrl-C or SIGTERM, stop them cleanly."""
    stopping = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.append(True))
    stages = pipeline_stages(settings, renderers, synthetic_ms, gateway=True)
    supervisor = Supervisor(stages, settings.to_env(),
                            log_dir or settings.home / "logs", restart=restart,
                            targets=targets_path(settings), pipeline=settings.kafka.topic_prefix)  # fmt: skip
    supervisor.start()
    try:
        supervisor.run_until(lambda: bool(stopping), state_file)
    finally:
        print("stopping the pipeline...", flush=True)
        codes = supervisor.stop()
        print("stopped: " + ", ".join(f"{name} ({code})" for name, code in codes.items()), flush=True)
        if state_file is not None:
            write_state(state_file, {"supervisor": os.getpid(), "stopped": codes, "stages": {}})
    return 0
