"""`aigc infra`: harmless twice, reports a dead service with its log, stops only what it started.

Runs its own Kafka and S3Proxy on separate ports and run directory, beside the session's services.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.launcher import InfraError, down, owned_pid, status, up
from infra.services import all_services
from plumbing.settings import InfraSettings, KafkaSettings, S3Settings, Settings
from plumbing.supervisor import free_ports
from tests.conftest import REPO

# Ports nothing listens on now (fixed ports collided with a listener in a CI-like run).
PORTS = dict(zip(("kafka", "controller", "s3", "cql"), free_ports(4), strict=True))
ONLY = ("kafka", "s3proxy")


@pytest.fixture
def own(tmp_path: Path):
    settings = Settings.load(
        kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{PORTS['kafka']}"),
        s3=S3Settings(endpoint_url=f"http://127.0.0.1:{PORTS['s3']}"),
        infra=InfraSettings(
            run_dir=tmp_path / "run",
            lib_dir=REPO / "infra" / "lib",
            kafka_controller_port=PORTS["controller"],
        ),
    )
    yield settings
    down(settings, echo=lambda _: None)


def ours(settings: Settings) -> list[int]:
    """Pids of live processes carrying this run directory's marker."""
    marker = f"-Daigc.run={settings.infra.run_dir.resolve()}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (
                    marker in (proc / "cmdline").read_bytes()
                    and b"Z" not in (proc / "stat").read_bytes().split(b")")[-1][:3]
                ):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def test_up_twice_is_harmless_and_down_leaves_nothing(own: Settings):
    up(own, attached=True, only=ONLY, echo=lambda _: None)
    services = {s.name: s for s in all_services(own)}
    first = {name: owned_pid(services[name]) for name in ONLY}
    assert all(first.values())
    assert (own.infra.run_dir / "kafka" / "data" / "meta.properties").exists()  # formatted on first start

    up(own, attached=True, only=ONLY, echo=lambda _: None)
    assert {name: owned_pid(services[name]) for name in ONLY} == first

    states = {s.name: s for s in status(own)}
    assert states["kafka"].ready and states["s3proxy"].ready
    assert not states["cassandra"].running

    down(own, echo=lambda _: None)
    assert ours(own) == []
    assert all(not s.running for s in status(own))


def test_a_killed_service_is_reported_with_its_log(own: Settings):
    up(own, attached=True, only=ONLY, echo=lambda _: None)
    s3 = next(s for s in all_services(own) if s.name == "s3proxy")
    pid = owned_pid(s3)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    for _ in range(50):
        if not next(s for s in status(own) if s.name == "s3proxy").running:
            break
        time.sleep(0.1)
    state = next(s for s in status(own) if s.name == "s3proxy")
    assert not state.running and "died" in state.note and str(s3.log_file) in state.note
    kafka = next(s for s in status(own) if s.name == "kafka")
    assert kafka.ready  # the others are untouched

    env = {
        **os.environ,
        "AIGC_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{PORTS['kafka']}",
        "AIGC_S3__ENDPOINT_URL": f"http://127.0.0.1:{PORTS['s3']}",
        "AIGC_INFRA__RUN_DIR": str(own.infra.run_dir),
        "AIGC_INFRA__KAFKA_CONTROLLER_PORT": str(PORTS["controller"]),
        "AIGC_CASSANDRA__PORT": str(PORTS["cql"]),
    }
    cli = subprocess.run(
        [sys.executable, "-m", "aigc", "infra", "status"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert cli.returncode == 1
    assert "s3proxy" in cli.stdout and "died" in cli.stdout


def test_a_port_held_by_someone_else_is_refused(own: Settings):
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", PORTS["s3"]))
        squatter.listen()
        with pytest.raises(InfraError, match=f"port {PORTS['s3']} is taken"):
            up(own, attached=True, only=("s3proxy",), echo=lambda _: None)
    assert ours(own) == []
