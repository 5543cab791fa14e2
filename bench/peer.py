"""The peer: B1, B2 and B3's synthetic workload on Celery 5 + Redis, so a reader can judge our figures
against a common task queue on the same machine in the same run.

The setup is the one such a queue is usually run with for slow GPU-style tasks: Debian's
``redis-server`` on a private loopback port (no persistence), Celery's prefork workers with
``acks_late`` and a prefetch of 1, and Redis's emulated priorities (``queue_order_strategy=priority``,
0 the most urgent: HIGH 0, NORMAL 5, LOW 9). A task sleeps its service time in ``steps`` slices, as the
synthetic renderer does, and pushes its timestamps to a Redis list that the harness reads. Celery has no
storage, moderation, rate limits or video assembly in this path, so its figures are a floor for what a
queue adds, not a like-for-like pipeline.

Workers run as ``python -m celery -A bench.peer worker`` processes; this module is also their app.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from celery import Celery

from bench.harness import steady_rate, summary
from plumbing.supervisor import free_port

REDIS_URL_ENV = "AIGC_BENCH_REDIS_URL"
DONE = "peer:done"
PRIORITY = {"HIGH": 0, "NORMAL": 5, "LOW": 9}

app = Celery("aigc-peer", broker=os.environ.get(REDIS_URL_ENV, "redis://127.0.0.1:1/0"))
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    task_default_queue="render",
    broker_transport_options={"queue_order_strategy": "priority", "priority_steps": list(range(10))},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


def wall_ms() -> float:
    """Epoch milliseconds with a fraction: not `plumbing.clock.now_ms`'s whole milliseconds, because the
    peer's timestamps cross processes (the worker's against the harness's, so a wall clock) and its
    overheads are a few milliseconds, which whole milliseconds would blur."""
    return time.time() * 1000


@functools.cache
def _results_client() -> Any:
    """This worker process's Redis client (the broker's)."""
    return app.connection_for_write().default_channel.client


@app.task(name="render")
def render(request_id: str, created_ms: float, service_ms: float, steps: int) -> None:
    """Sleep the service time in ``steps`` slices and report when the work started and finished."""
    started = wall_ms()
    for _ in range(steps):
        time.sleep(service_ms / steps / 1000)
    finished = wall_ms()
    _results_client().rpush(DONE, json.dumps({"id": request_id, "started": started, "finished": finished}))


# -- harness ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway redis-server on a free loopback port; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="aigc-peer-redis-") as workdir:
        proc = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                workdir,
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


@contextlib.contextmanager
def workers(url: str, concurrency: int) -> Iterator[None]:
    """One Celery worker process with ``concurrency`` prefork children, ready when it yields."""
    env = {**os.environ, REDIS_URL_ENV: url}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.peer",
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            str(concurrency),
            "--prefetch-multiplier",
            "1",
            "-O",
            "fair",
            "--queues",
            "render",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            "WARNING",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        peer = Celery("aigc-peer-ping", broker=url)
        deadline = time.monotonic() + 60
        while not (peer.control.ping(timeout=0.5) or []):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the Celery worker did not start")
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Run:
    """Sends tasks at Poisson arrival times (open loop) and collects every one's timestamps."""

    def __init__(self, url: str, service_ms: float, steps: int) -> None:
        app.conf.broker_url = url
        self.client = app.connection_for_write().default_channel.client
        self.client.delete(DONE)
        self.service_ms, self.steps = service_ms, steps
        self.sent: dict[str, tuple[str, float]] = {}  # id -> (priority, created ms)
        self.done: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        reader = app.connection_for_read().default_channel.client
        while not self._stop.is_set():
            item = reader.blpop([DONE], timeout=0.2)
            if item is not None:
                record = json.loads(item[1])
                record["received"] = wall_ms()
                self.done[record["id"]] = record

    def send(self, priority: str) -> str:
        """Send one task of ``priority`` now; its request id."""
        request_id = f"p{len(self.sent)}-{priority[0]}-{random.getrandbits(32):08x}"
        created = wall_ms()
        self.sent[request_id] = (priority, created)
        render.apply_async((request_id, created, self.service_ms, self.steps), priority=PRIORITY[priority])
        return request_id

    def poisson(self, rate: float, duration_s: float, priority: str, seed: int) -> list[str]:
        """Tasks at Poisson arrival times, ``rate`` a second for ``duration_s``; their ids."""
        rng, ids, start = random.Random(seed), [], time.monotonic()
        at = rng.expovariate(rate)
        while at < duration_s:
            wait = start + at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            ids.append(self.send(priority))
            at += rng.expovariate(rate)
        return ids

    def wait(self, ids: list[str], timeout_s: float) -> None:
        """Until every one of ``ids`` has reported (or ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(i not in self.done for i in ids):
            time.sleep(0.05)

    def figures(self, ids: list[str]) -> dict[str, Any]:
        """e2e = created -> the harness saw the result; queue wait = created -> started."""
        finished = [(self.sent[i][1], self.done[i]) for i in ids if i in self.done]
        return {
            "requests": len(ids),
            "completed": len(finished),
            "not_completed": len(ids) - len(finished),
            "e2e_ms": summary([d["received"] - c for c, d in finished]),
            "queue_wait_ms": summary([d["started"] - c for c, d in finished]),
            "overhead_ms": summary([d["received"] - c - (d["finished"] - d["started"]) for c, d in finished]),
        }

    def close(self) -> None:
        """Stop reading results."""
        self._stop.set()
        self._reader.join(2)


def peer(quick: bool) -> dict[str, Any]:
    """B1, B2 and B3 of `bench.scenarios` on Celery + Redis, with the same rates and worker counts."""
    duration = 20.0 if quick else 45.0
    out: dict[str, Any] = {
        "setup": "Celery + Redis (redis-server, prefork workers, acks_late, prefetch 1, priorities 0/5/9); "
        "a task sleeps its service time; no storage in the path",
        "versions": {"celery": _version("celery"), "redis-server": _redis_version()},
    }
    with redis_server() as url:
        # B1: 8 workers of 200 ms (40/s capacity) at 10% and 50% load.
        with workers(url, 8):
            b1: dict[str, Any] = {"workers": 8, "service_ms": 200.0}
            for share in (0.1, 0.5):
                run = Run(url, 200.0, 10)
                ids = run.poisson(40 * share, duration, "NORMAL", seed=7)
                run.wait(ids, 120)
                b1[f"load_{int(share * 100)}pct"] = run.figures(ids)
                run.close()
            out["B1"] = b1
        # B2: completed tasks per second with 0 ms service, the same 2,000/s offered load.
        with workers(url, 4):
            count = 1500 if quick else 4000
            run = Run(url, 0.0, 1)
            started = time.monotonic()
            ids = run.poisson(2000.0, count / 2000.0, "NORMAL", seed=7)
            submitted_s = time.monotonic() - started
            run.wait(ids, 300)
            done = sorted(run.done[i]["received"] for i in ids if i in run.done)
            rate = steady_rate(done)
            out["B2"] = {
                "workers": 4,
                "requests": len(ids),
                "completed": len(done),
                "submitted_per_s": len(ids) / submitted_s,
                "completed_per_s": rate,
            }
            run.close()
        # B3: 4 workers of 200 ms (20/s), HIGH at 2/s, alone and under a LOW flood at 10x capacity.
        b3: dict[str, Any] = {
            "workers": 4,
            "service_ms": 200.0,
            "high_rate_per_s": 2.0,
            "low_rate_per_s": 200.0,
        }
        for variant in ("baseline", "flood"):
            with workers(url, 4):
                run = Run(url, 200.0, 10)
                flood = threading.Thread(
                    target=run.poisson, args=(200.0, duration + 3, "LOW", 2), daemon=True
                )
                if variant == "flood":
                    flood.start()
                    time.sleep(3)
                high = run.poisson(2.0, duration, "HIGH", seed=1)
                run.wait(high, 60)
                figures = run.figures(high)
                lows = [i for i, (p, _) in list(run.sent.items()) if p == "LOW"]
                b3[variant] = {
                    "high_requests": figures["requests"],
                    "high_completed": figures["completed"],
                    "high_queue_wait_ms": figures["queue_wait_ms"],
                    "high_e2e_ms": figures["e2e_ms"],
                    "low_offered": len(lows),
                    "low_completed_during_run": sum(1 for i in lows if i in run.done),
                }
                if flood.is_alive():
                    flood.join(duration + 10)
                run.close()
        out["B3"] = b3
    return out


def _version(package: str) -> str:
    from importlib import metadata

    return metadata.version(package)


def _redis_version() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        return "missing"
    text = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    return next((w[2:] for w in text.split() if w.startswith("v=")), text.strip())
