"""GW: what the HTTP gateway adds to a submission, how many one gateway process accepts a second, and
how long a status event takes from the status topic to an SSE client.

- Added latency: the same image request submitted one at a time through the SDK (`Client.submit`, which
  returns on the broker's acknowledgement) and over HTTP (POST /v1/generations on a kept-alive connection,
  which also answers after the acknowledgement); p50 and p99 of each and their difference. The HTTP figure
  twice: with httpx (``added_ms``, whose own Python costs a loaded machine about 2 ms a request), and with
  the bare socket client the throughput test uses (``added_raw_ms``: what the gateway itself adds). The
  three are taken in turns, one submission each (`_interleaved`), so each sees the same machine: measured
  one series after the other, a later series ran while the pipeline still worked off the earlier ones.
- Throughput: POSTs from ``CONNECTIONS`` kept-alive connections for ``window_s`` against one gateway
  process (a small asyncio HTTP/1.1 client, so the load generator costs less than the server), and the
  gateway's CPU time per accepted submission (from /proc), which does not depend on what else the machine
  runs: 1000 / it is what one process accepts a second with a core of its own.
- SSE: a request owned by the bench tenant with no renderer work behind it; the bench appends StatusEvents
  for it to the status topic at a steady pace and times each from just before its produce call to its
  arrival on an open event stream (so the figure includes the produce itself: an upper bound); taken after
  the latency series and before the throughput window, whose flood the pipeline then works off for minutes.

Targets (issue 12): <= 3 ms p50 / 10 ms p99 added, >= 1,000 submissions/s, SSE <= 50 ms p99.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from bench.harness import percentile
from infra.pipeline import running_pipeline
from plumbing.clock import now_ms
from plumbing.kafka_clients import make_producer
from plumbing.metadata import connect
from plumbing.settings import Settings
from plumbing.supervisor import free_port
from plumbing.topics import Topics
from producers.client import Client
from producers.gateway.keys import KeyStore
from schemas.codec import default_codec
from schemas.records import GenerationRequest, Progress, StatusEvent

CONNECTIONS = 32
BODY: dict[str, Any] = {"prompt": "a bench lantern", "width": 64, "height": 64, "steps": 1}


def _ms(values: list[float]) -> dict[str, float | None]:
    """p50 and p99 of ``values`` (ms, to the microsecond) and their count."""
    return {
        "p50": round(percentile(values, 50) or 0, 3),
        "p99": round(percentile(values, 99) or 0, 3),
        "n": len(values),
    }


async def _post_loop(port: int, key: str, stop_at: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps(BODY).encode()
    head = (
        f"POST /v1/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    try:
        while time.monotonic() < stop_at:
            writer.write(head + body)
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            counts[0 if b" 202 " in status else 1] += 1
    finally:
        writer.close()


class RawPoster:
    """POSTs on one kept-alive socket, written and read as `_post_loop` does (the client costs next to
    nothing)."""

    def __init__(self, port: int, key: str) -> None:
        body = json.dumps({**BODY, "model": _synth()}).encode()
        self.request = (
            f"POST /v1/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.answers = self.sock.makefile("rb")

    def post(self) -> None:
        """One submission, answered 202."""
        self.sock.sendall(self.request)
        status, length = self.answers.readline(), 0
        while (line := self.answers.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        self.answers.read(length)
        assert b" 202 " in status, status

    def close(self) -> None:
        """Close the socket."""
        self.answers.close()
        self.sock.close()


def _interleaved(submits: Mapping[str, Callable[[], object]], n: int) -> dict[str, list[float]]:
    """The ms of ``n`` submissions by each of ``submits``, taken in turns (the order rotating each round),
    so every way sees the same machine: the pipeline working off what the others sent, the same load."""
    names = list(submits)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(n):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t = time.perf_counter()
            submits[name]()
            times[name].append((time.perf_counter() - t) * 1000)
    return times


def _synth() -> str:
    from bench.scenarios import SYNTH

    return SYNTH


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _throughput(port: int, key: str, window_s: float, pid: int | None = None) -> dict[str, Any]:
    counts = [0, 0]
    cpu0 = cpu_s(pid) if pid else 0.0
    began = time.monotonic()
    await asyncio.gather(*(_post_loop(port, key, began + window_s, counts) for _ in range(CONNECTIONS)))
    elapsed = time.monotonic() - began
    if pid and counts[0]:
        # What one submission costs the gateway in CPU, whatever else the machine runs: the rate one
        # process could accept with a core of its own is 1000 / this.
        cpu_ms = (cpu_s(pid) - cpu0) * 1000 / counts[0]
        counts_extra = {
            "gateway_cpu_ms_per_submission": round(cpu_ms, 3),
            "per_core_capacity_per_s": round(1000 / cpu_ms),
        }
    else:
        counts_extra = {}
    return {
        **counts_extra,
        "accepted_per_s": round(counts[0] / elapsed, 1),
        "accepted": counts[0],
        "other": counts[1],
        "connections": CONNECTIONS,
        "window_s": round(elapsed, 1),
    }


def _sse_latency(settings: Settings, url: str, key: str, events: int) -> dict[str, Any]:
    """Status events produced for a request with no work behind it, timed to their SSE arrival."""
    rid = f"gwbench{uuid.uuid4().hex[:16]}"
    cluster, session = connect(settings.cassandra)
    try:
        session.execute(
            f"INSERT INTO {settings.cassandra.keyspace}.gateway_requests (request_id, tenant_id, kind, "
            "prompt, width, height, steps, frames, created_at) VALUES (%s, 'bench', 'IMAGE', 'sse', 64, 64, "
            "%s, 1, toTimestamp(now()))",
            (rid, events),
        )
    finally:
        cluster.shutdown()
    sent: dict[int, float] = {}
    latencies: list[float] = []
    ready = threading.Event()

    def listen() -> None:
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.stream("GET", f"{url}/v1/generations/{rid}/events", headers=headers, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith(":"):  # the first comment comes once the stream's consumer is assigned
                    ready.set()
                elif line.startswith("data: "):
                    got = time.perf_counter()
                    done = json.loads(line[6:])["progress"]["done"]
                    latencies.append((got - sent[done]) * 1000)
                    if done == events:
                        return

    codec = default_codec()
    producer = make_producer(settings, "bench-sse")
    topic = Topics(settings).status
    # Connected and its producer id granted (half a second here) before anything is timed.
    producer.list_topics(topic, timeout=10)
    warm = StatusEvent(request_id=f"{rid}w", tenant_id="bench", stage="renderer", state="QUEUED", at=now_ms())
    producer.produce(topic, codec.write(warm), key=f"{rid}w")
    producer.flush(10)
    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    ready.wait(30)
    for i in range(1, events + 1):
        record = StatusEvent(
            request_id=rid,
            tenant_id="bench",
            stage="renderer",
            state="RUNNING",
            progress=Progress(done=i, total=events, request_total=events),
            task_id=f"{rid}-t0",
            worker_id="bench",
            at=now_ms(),
        )
        sent[i] = time.perf_counter()
        producer.produce(topic, codec.write(record), key=rid)
        producer.poll(0)
        time.sleep(0.02)
    producer.flush(10)
    listener.join(30)
    return {"latency_ms": _ms(latencies), "produced": events, "received": len(latencies)}


def _sdk_request() -> GenerationRequest:
    """BODY as the SDK submits it: a fresh request_id, created now, with the fields the HTTP API fills."""
    from bench.scenarios import SYNTH

    return GenerationRequest(
        request_id=uuid.uuid4().hex,
        tenant_id="bench",
        kind="IMAGE",
        prompt=BODY["prompt"],
        model=SYNTH,
        width=BODY["width"],
        height=BODY["height"],
        steps=BODY["steps"],
        guidance_scale=7.5,
        created_at=now_ms(),
    )


def gw_gateway(settings: Settings, quick: bool) -> dict[str, Any]:
    """The HTTP gateway: latency it adds to a submission, submissions/s, SSE delivery latency."""
    from bench.scenarios import SYNTH, configure

    port = free_port()
    base = configure(settings, synthetic=True, max_batch=8)
    base = base.model_copy(
        update={
            "gateway": base.gateway.model_copy(
                update={"port": port, "rate_per_s": 1e6, "rate_burst": 1e6, "key_cache_s": 600.0}
            )
        }
    )
    n = 200 if quick else 1000
    with running_pipeline(
        base, synthetic_ms=0, isolate="benchgw", drop=True, gateway=True, echo=lambda _: None
    ) as pipe:
        s = pipe.settings
        cluster, session = connect(s.cassandra)
        try:
            key = KeyStore(session, s.cassandra.keyspace).create("bench")[1]
        finally:
            cluster.shutdown()
        url = f"http://127.0.0.1:{port}"
        with (
            Client(s) as client,
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as h,
        ):
            raw = RawPoster(port, key)

            def http_post() -> None:
                r = h.post("/v1/generations", json={**BODY, "model": SYNTH})
                assert r.status_code == 202, r.text

            submits = {"sdk": lambda: client.submit(_sdk_request()), "http": http_post, "raw": raw.post}
            try:
                _interleaved(submits, 50)  # warm: connections, metadata, the key cache
                times = _interleaved(submits, n)
            finally:
                raw.close()
        sdk_ms, http_ms, raw_ms = _ms(times["sdk"]), _ms(times["http"]), _ms(times["raw"])
        added = {q: round((http_ms[q] or 0) - (sdk_ms[q] or 0), 3) for q in ("p50", "p99")}
        added_raw = {q: round((raw_ms[q] or 0) - (sdk_ms[q] or 0), 3) for q in ("p50", "p99")}
        gateway_pid = pipe.supervisor.children["gateway"].proc.pid
        # SSE before the throughput window: after it, the pipeline works off its 20,000-odd submissions
        # (twenty times what it renders a second) on the same two cores for minutes.
        sse = _sse_latency(s, url, key, 100 if quick else 300)
        rate = asyncio.run(_throughput(port, key, 5.0 if quick else 10.0, gateway_pid))
    return {
        "sdk_submit_ms": sdk_ms,
        "http_submit_ms": http_ms,
        "added_ms": added,
        "raw_submit_ms": raw_ms,
        "added_raw_ms": added_raw,
        "throughput": rate,
        "sse": sse,
        "targets": {"added_p50_ms": 3, "added_p99_ms": 10, "accepted_per_s": 1000, "sse_p99_ms": 50},
    }
