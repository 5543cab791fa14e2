"""`aigc infra up | down | status`: the local services as processes we own.

`up` formats Kafka's storage on first start, starts every service that is not already running from
this run directory, waits until each one is ready for clients, and reports how long that took. It is
harmless to run twice: a service whose recorded process is alive is left alone. A port held by a
process that is not ours is reported instead of fought over.

`down` signals only processes it can prove it started: the pid recorded in ``<run>/<svc>/pid`` must
still be a process whose command line names this run directory (``-Daigc.run=<run dir>`` for a JVM,
the config file in it for Prometheus).

``attached=True`` (the test suite) asks the kernel to SIGTERM the services if the starting process
dies, so a killed test run leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from infra.services import Kafka, Service, all_services, port_open
from plumbing.settings import Settings

STOP_TIMEOUT_S = 30.0
QUORUM_GRACE_S = (
    5.0  # a cluster's last Kafka node waits this long for a quorum that has gone (see _QuorumWatch)
)
LOG_TAIL_LINES = 25
_PR_SET_PDEATHSIG = 1
_exit_codes: dict[int, int] = {}  # children reaped by _exited, for error messages


class InfraError(RuntimeError):
    """A service could not be started or stopped; the message names it and shows its log."""


@dataclass(frozen=True)
class ServiceState:
    """What `status` found for one service: its process, whether it runs and answers, its ports."""

    name: str
    pid: int | None
    running: bool
    ready: bool
    ports: tuple[int, ...]
    note: str = ""


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of the log at ``path`` (of its last 64 KiB), or a note that it has none."""
    if not path.exists():
        return "(no log)"
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - 64 * 1024))
        text = fh.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:]) or "(the log is empty)"


def cmdline(pid: int) -> list[str]:
    """The command line of process ``pid`` (empty when it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def owned_pid(service: Service) -> int | None:
    """The pid of this run directory's process for ``service``, if it is alive; else None."""
    try:
        pid = int(service.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if service.owns(cmdline(pid)) else None


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _start(service: Service, attached: bool) -> int:
    service.check_jars()
    service.prepare()
    for port in service.ports:
        if port_open(port):
            raise InfraError(f"{service.name}: port {port} is taken by a process this run did not start")
    if isinstance(service, Kafka):
        _format([service])
    with service.log_file.open("ab") as log:
        proc = subprocess.Popen(
            service.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=service.dir,
            start_new_session=not attached,
            preexec_fn=_die_with_parent if attached else None,  # noqa: PLW1509
        )
    service.pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


def _format(nodes: list[Kafka]) -> None:
    """Format the storage of the Kafka ``nodes`` that need it, all at once (a JVM each, ~2 s of CPU):
    KRaft nodes are formatted once, before their first start, and a cluster's with one shared id."""
    pending = [node for node in nodes if node.needs_format()]
    for node in pending:
        node.check_jars()
        node.prepare()
    commands = [node.format_command() for node in pending]  # here: the first one writes the shared id
    with ThreadPoolExecutor(max(1, len(pending))) as pool:
        results = list(
            pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True, check=False), commands)
        )
    for node, result in zip(pending, results, strict=True):
        if result.returncode != 0:
            raise InfraError(f"{node.name}: formatting storage failed:\n{result.stdout}{result.stderr}")


def selected(service: Service, only: Iterable[str] | None) -> bool:
    """Whether ``only`` (service names; None: all) names ``service``; "kafka" names every Kafka node, so
    ``only=["kafka"]`` means the whole cluster and ``only=["kafka-2"]`` one node of it."""
    if only is None:
        return True
    names = set(only)
    return service.name in names or (isinstance(service, Kafka) and "kafka" in names)


def _wait_ready(service: Service, pid: int, deadline: float) -> float:
    started = time.monotonic()
    while time.monotonic() < deadline:
        if _exited(pid):
            code = _exit_codes.get(pid, "unknown")
            raise InfraError(
                f"{service.name} (pid {pid}) exited with status {code} while starting; "
                f"last lines of {service.log_file}:\n{log_tail(service.log_file)}"
            )
        if service.ready():
            return time.monotonic() - started
        time.sleep(0.25)
    raise InfraError(
        f"{service.name} was not ready in time; last lines of {service.log_file}:\n"
        f"{log_tail(service.log_file)}"
    )


def _exited(pid: int) -> bool:
    """Reap ``pid`` if it is our exited child; True when it is gone."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            _exit_codes[pid] = os.waitstatus_to_exitcode(status)
            return True
    except ChildProcessError:
        pass  # not our child (started by an earlier `aigc infra up`)
    return not Path(f"/proc/{pid}").exists() or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def up(
    settings: Settings,
    *,
    attached: bool = False,
    only: Iterable[str] | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, float]:
    """Start what is not running and wait until everything is ready; returns seconds to ready per service."""
    services = [s for s in all_services(settings) if selected(s, only)]
    settings.infra.run_dir.mkdir(parents=True, exist_ok=True)
    pids: dict[str, int] = {}
    fresh: set[str] = set()
    _format([s for s in services if isinstance(s, Kafka) and owned_pid(s) is None])
    for service in services:
        pid = owned_pid(service)
        if pid is None:
            pid = _start(service, attached)
            fresh.add(service.name)
            echo(f"{service.name}: started (pid {pid}, log {service.log_file})")
        else:
            echo(f"{service.name}: already running (pid {pid})")
        pids[service.name] = pid
    deadline = time.monotonic() + settings.infra.ready_timeout_s
    with ThreadPoolExecutor(len(services)) as pool:
        futures = {s.name: pool.submit(_wait_ready, s, pids[s.name], deadline) for s in services}
        timings = {}
        errors = []
        for name, future in futures.items():
            try:
                timings[name] = future.result()
                echo(
                    f"{name}: ready on 127.0.0.1:{','.join(map(str, _ports(services, name)))}"
                    + (f" after {timings[name]:.1f} s" if name in fresh else "")
                )
            except InfraError as exc:
                errors.append(str(exc))
    if errors:
        raise InfraError("\n\n".join(errors))
    return timings


def _ports(services: list[Service], name: str) -> tuple[int, ...]:
    return next(s.ports for s in services if s.name == name)


def down(
    settings: Settings, *, only: Iterable[str] | None = None, echo: Callable[[str], None] = print
) -> list[str]:
    """Stop the services this run directory started (SIGTERM, then SIGKILL after a grace period)."""
    stopping: dict[Service, int] = {}
    for service in all_services(settings) + _other_layout_brokers(settings):
        if not selected(service, only):
            continue
        pid = owned_pid(service)
        if pid is None:
            service.pid_file.unlink(missing_ok=True)
            continue
        os.kill(pid, signal.SIGTERM)
        stopping[service] = pid
    deadline = time.monotonic() + STOP_TIMEOUT_S
    quorum = _QuorumWatch(echo)
    while stopping and time.monotonic() < deadline:
        for service, pid in list(stopping.items()):
            if _exited(pid):
                echo(f"{service.name}: stopped")
                service.pid_file.unlink(missing_ok=True)
                del stopping[service]
        quorum.check(stopping)
        time.sleep(0.2)
    for service, pid in stopping.items():
        echo(f"{service.name}: did not stop in {STOP_TIMEOUT_S:.0f} s, killing pid {pid}")
        os.kill(pid, signal.SIGKILL)
        while not _exited(pid):
            time.sleep(0.1)
        service.pid_file.unlink(missing_ok=True)
    return [s.name for s in stopping]


class _QuorumWatch:
    """Ends the Kafka nodes that can no longer stop cleanly while a cluster shuts down.

    A node's controlled shutdown waits (up to 5 minutes) for the controller quorum to approve it, which
    needs a majority of the voters; once the nodes still alive are no majority (two of three gone), the
    rest wait in vain, so after QUORUM_GRACE_S they get SIGKILL: their logs are recovered on the next
    start, nothing acknowledged is lost. A single broker is always its own majority: never applies."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.lost_at: float | None = None
        self.killed: set[int] = set()

    def check(self, stopping: dict[Service, int]) -> None:
        """SIGKILL the Kafka nodes of ``stopping`` once their quorum has been gone for QUORUM_GRACE_S."""
        nodes = [s for s in stopping if isinstance(s, Kafka)]
        if not nodes:
            return
        cluster = nodes[0].cluster
        alive = sum(1 for node in cluster if owned_pid(node) is not None)
        if alive * 2 > len(cluster):
            return
        now = time.monotonic()
        self.lost_at = self.lost_at or now
        if now - self.lost_at < QUORUM_GRACE_S:
            return
        for node in nodes:
            pid = stopping[node]
            if pid not in self.killed:
                self.echo(
                    f"{node.name}: the controller quorum is gone ({alive} of {len(cluster)} nodes left), "
                    f"so its controlled shutdown cannot finish; killing pid {pid}"
                )
                os.kill(pid, signal.SIGKILL)
                self.killed.add(pid)


def kill(settings: Settings, name: str, sig: int = signal.SIGKILL, timeout_s: float = 10.0) -> int | None:
    """Send ``sig`` to this run directory's process of service ``name`` (``kafka-2``: the broker with
    node.id 2) and, for SIGKILL (a crash), wait until it is gone. Returns its pid, or None when it was not
    running. Its pid file stays, so `status` reports it dead until `up` (``only=[name]``) restarts it."""
    service = next((s for s in all_services(settings) if s.name == name), None)
    if service is None:
        known = ", ".join(s.name for s in all_services(settings))
        raise ValueError(f"no service {name!r} (services: {known})")
    pid = owned_pid(service)
    if pid is None:
        return None
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout_s
    while sig == signal.SIGKILL and not _exited(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pid


def _other_layout_brokers(settings: Settings) -> list[Service]:
    """The Kafka nodes of the other broker count (``kafka`` or ``kafka-1..3``) that this run directory
    still runs, so that `down` stops a cluster started with ``--brokers 3`` even without the setting."""
    other = 3 if settings.infra.brokers == 1 else 1
    layout = settings.model_copy(update={"infra": settings.infra.model_copy(update={"brokers": other})})
    return [node for i in range(1, other + 1) if owned_pid(node := Kafka(layout, i)) is not None]


def status(settings: Settings) -> list[ServiceState]:
    """What each service is doing now; a recorded process that died is reported with its log tail."""
    states = []
    for service in all_services(settings):
        pid = owned_pid(service)
        if pid is not None and not _zombie(pid):
            ready = service.ready()
            states.append(
                ServiceState(
                    service.name,
                    pid,
                    True,
                    ready,
                    service.ports,
                    "" if ready else "running but not answering clients",
                )
            )
        elif service.pid_file.exists():
            states.append(
                ServiceState(
                    service.name,
                    None,
                    False,
                    False,
                    service.ports,
                    f"died; last lines of {service.log_file}:\n{log_tail(service.log_file)}",
                )
            )
        else:
            states.append(ServiceState(service.name, None, False, False, service.ports, "stopped"))
    return states


def rss_mb(settings: Settings) -> dict[str, float]:
    """Resident memory of each running service, in MiB."""
    out = {}
    for service in all_services(settings):
        pid = owned_pid(service)
        if pid is None:
            continue
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out[service.name] = int(line.split()[1]) / 1024
    return out
