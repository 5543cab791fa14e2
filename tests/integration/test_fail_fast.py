"""Every client verb fails fast, with one clear line, when a service it needs does not answer.

The settings point at a loopback port nothing listens on (a real closed port, not a fake), and the
real `aigc` command runs as a person would run it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from plumbing.settings import Settings

FAST_S = 8.0  # a couple of seconds of connect timeout, plus the interpreter's start


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def aigc(*args: str, env: dict[str, str]) -> tuple[int, str, str, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "aigc", *args],
        env={**os.environ, "AIGC_HOME": "/nonexistent-aigc-home", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started


@pytest.mark.parametrize(
    ("args", "service", "variable"),
    [
        (["submit", "a cat"], "Kafka", "AIGC_KAFKA__BOOTSTRAP_SERVERS"),
        (["watch", "--timeout", "5"], "Kafka", "AIGC_KAFKA__BOOTSTRAP_SERVERS"),
        (["cancel", "r1"], "Kafka", "AIGC_KAFKA__BOOTSTRAP_SERVERS"),
        (["dlq", "ls"], "Kafka", "AIGC_KAFKA__BOOTSTRAP_SERVERS"),
        (["get", "r1"], "Cassandra", "AIGC_CASSANDRA__PORT"),
        (["dlq", "replay"], "Cassandra", "AIGC_CASSANDRA__PORT"),
        (["check", "--since-s", "5"], "S3", "AIGC_S3__ENDPOINT_URL"),
    ],
)
def test_a_verb_whose_service_is_down_says_so_in_one_line_at_once(
    infra: Settings, args: list[str], service: str, variable: str
) -> None:
    port = closed_port()
    value = f"http://127.0.0.1:{port}" if variable == "AIGC_S3__ENDPOINT_URL" else str(port)
    if variable == "AIGC_KAFKA__BOOTSTRAP_SERVERS":
        value = f"127.0.0.1:{port}"
    # The other services are the running test ones, so the verb gets as far as the one that is down.
    running = {
        "AIGC_KAFKA__BOOTSTRAP_SERVERS": infra.kafka.bootstrap_servers,
        "AIGC_CASSANDRA__PORT": str(infra.cassandra.port),
        "AIGC_S3__ENDPOINT_URL": infra.s3.endpoint_url,
    }
    code, out, err, took = aigc(*args, env={**running, variable: value})
    assert code == 1, (out, err)
    assert took < FAST_S, f"took {took:.1f} s"
    assert err.splitlines() == [
        f"aigc {args[0]}: {service} at 127.0.0.1:{port} is not reachable; "
        "start it with `make run` or `aigc infra up`"
    ], err
    assert out == ""


def test_a_port_that_is_no_kafka_broker_fails_in_one_line() -> None:
    """Past the reachability check (the port accepts, then hangs up), Kafka's own error is one line
    too, and librdkafka's log lines are debug lines: not shown without -v."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        stop = threading.Event()

        def hang_up() -> None:
            listener.settimeout(0.2)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    listener.accept()[0].close()

        thread = threading.Thread(target=hang_up, daemon=True)
        thread.start()
        try:
            code, out, err, took = aigc(
                "watch", "--timeout", "3", env={"AIGC_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{port}"}
            )
        finally:
            stop.set()
            thread.join()
    assert code == 1, (out, err)
    assert took < 15.0, f"took {took:.1f} s"  # the client's 10 s metadata timeout at most
    assert len(err.splitlines()) == 1, err
    assert err.startswith("aigc watch: ") and "Traceback" not in err, err
    assert "librdkafka" not in err
