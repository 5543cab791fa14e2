"""`aigc up | status | down` for real: its own Kafka, Cassandra and S3Proxy on free ports, its own home
and run directory, the stages in the background, one request through, then everything stopped.

It starts its own JVMs (about a minute or two on a small machine), so it is one test. It stops Kafka
before the stages, the wrong order a person may use, and checks `aigc down` still stops promptly.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.launcher import down as infra_down
from plumbing.settings import Settings
from plumbing.supervisor import STOP_GRACE_S, free_ports

REPO = Path(__file__).resolve().parents[2]
UP_TIMEOUT_S = 600.0


@pytest.mark.slow
def test_up_status_submit_down(tmp_path: Path) -> None:
    kafka, controller, cql, storage, s3, prometheus = free_ports(6)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIGC_")},
        "AIGC_HOME": str(tmp_path / "home"),
        "AIGC_INFRA__RUN_DIR": str(tmp_path / "run"),
        "AIGC_INFRA__LIB_DIR": str(REPO / "infra" / "lib"),
        "AIGC_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka}",
        "AIGC_INFRA__KAFKA_CONTROLLER_PORT": str(controller),
        "AIGC_CASSANDRA__PORT": str(cql),
        "AIGC_INFRA__CASSANDRA_STORAGE_PORT": str(storage),
        "AIGC_S3__ENDPOINT_URL": f"http://127.0.0.1:{s3}",
        "AIGC_INFRA__PROMETHEUS_PORT": str(prometheus),
        "AIGC_KAFKA__REQUEST_PARTITIONS": "1",
        "AIGC_KAFKA__RENDER_PARTITIONS": "1",
        "AIGC_KAFKA__PARTITIONS": "1",
        "AIGC_MODELS": json.dumps({"tiny-sd": {"path": str(tmp_path / "none"), "backend": "synthetic"}}),
        "AIGC_RENDERER__SYNTHETIC_MS_PER_FRAME": "5",
    }

    def aigc(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "aigc", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip

    started = time.monotonic()
    try:
        up = aigc("up", timeout=UP_TIMEOUT_S)
        assert up.returncode == 0, up.stdout + up.stderr
        print(f"aigc up took {time.monotonic() - started:.1f} s")
        assert "pipeline: ready" in up.stdout

        status = aigc("status")
        assert status.returncode == 0, status.stdout + status.stderr
        for name in (
            "kafka",
            "cassandra",
            "s3proxy",
            "prometheus",
            "gatekeeper",
            "renderer-default-0",
            "assembler",
            "relay",
        ):
            line = next((ln for ln in status.stdout.splitlines() if ln.split()[:1] == [name]), "")
            assert "ready" in line, f"{name}: {status.stdout}"

        submit = aigc("submit", "a cat", "--tenant", "svc", "--wait", "--timeout", "120", timeout=180)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        assert "SUCCEEDED" in submit.stdout

        # The wrong order: Kafka goes first. The stages must still stop within their bound.
        settings = Settings(_env_file=None, **_settings_from(env))  # type: ignore[call-arg]
        infra_down(settings, only=["kafka"], echo=lambda _: None)
        stopping = time.monotonic()
        down = aigc("down", timeout=120)
        took = time.monotonic() - stopping
        assert down.returncode == 0, down.stdout + down.stderr
        print(f"aigc down with Kafka already gone took {took:.1f} s:\n{down.stdout}")
        stages_s = float(re.search(r"pipeline: stopped in ([0-9.]+) s", down.stdout)[1])  # type: ignore[index]
        # Each stage stops on its own, within the supervisor's grace: none had to be killed. (How long a
        # client's close waits for an absent broker varies: one CI run's stages took 20.3 s.)
        assert stages_s < STOP_GRACE_S, down.stdout
        assert "did not stop" not in down.stdout

        after = aigc("status")
        assert after.returncode == 1
        assert "pipeline               down" in after.stdout, after.stdout
        assert all(" down " in ln for ln in after.stdout.splitlines()[:3]), after.stdout
    finally:
        aigc("down", timeout=120)  # whatever the test reached, nothing is left running
    print(f"whole test {time.monotonic() - started:.1f} s")


def _settings_from(env: dict[str, str]) -> dict[str, object]:
    """The run directory and ports the test gave `aigc`, as Settings fields."""
    return {
        "infra": {
            "run_dir": env["AIGC_INFRA__RUN_DIR"],
            "lib_dir": env["AIGC_INFRA__LIB_DIR"],
            "kafka_controller_port": int(env["AIGC_INFRA__KAFKA_CONTROLLER_PORT"]),
            "cassandra_storage_port": int(env["AIGC_INFRA__CASSANDRA_STORAGE_PORT"]),
            "prometheus_port": int(env["AIGC_INFRA__PROMETHEUS_PORT"]),
        },
        "kafka": {"bootstrap_servers": env["AIGC_KAFKA__BOOTSTRAP_SERVERS"]},
        "cassandra": {"port": int(env["AIGC_CASSANDRA__PORT"])},
        "s3": {"endpoint_url": env["AIGC_S3__ENDPOINT_URL"]},
    }
