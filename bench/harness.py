"""The benchmark harness: open-loop load and per-request timings (each scenario runs its own pipeline).

Each scenario runs the real stage processes with `infra.pipeline.running_pipeline` on a topic prefix and
keyspace of its own (so it starts with empty topics, dropped at its end), with the scenario's settings.
`Load` submits requests through the SDK on a Poisson schedule (open loop: arrivals do not wait for
completions) or as a standing backlog. `Collector` reads the run's completions and FramesRendered
records as they arrive and keeps, per request, the client-side submit and receive times and what the
stages reported (acceptance, queue wait, render time, assembly), from which the scenarios compute their
figures.
"""

from __future__ import annotations

import collections
import random
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from plumbing.kafka_clients import consume_available, make_consumer
from plumbing.settings import Settings
from plumbing.topics import Topics
from producers.client import Client, now_ms
from schemas.codec import default_codec


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q`` percentile (0-100) by linear interpolation; None for no values."""
    data = sorted(values)
    if not data:
        return None
    rank = (len(data) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)


def steady_rate(done_ms: Sequence[float]) -> float:
    """Completions per second over the completion times ``done_ms`` (sorted), skipping the first fifth:
    start-up and fetch warm-up."""
    steady = done_ms[len(done_ms) // 5 :]
    return (len(steady) - 1) / ((steady[-1] - steady[0]) / 1000) if len(steady) > 1 else 0.0


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
    }


@dataclass
class RequestTiming:
    request_id: str
    priority: str
    frames: int
    submitted_ms: int  # created_at, on the client
    received_ms: int | None = None  # when the Completion reached the client
    status: str | None = None
    reason: str | None = None  # the Completion's reason_code
    timings: dict[str, int] = field(default_factory=dict)  # the Completion's
    finished_ms: int | None = None  # when the sink decided (the Completion's finished_at)
    tasks: list[dict[str, Any]] = field(default_factory=list)  # FramesRendered facts, one per task

    @property
    def outcome(self) -> str:
        """What became of the request: SUCCEEDED, the status and reason of any other end, or NO ANSWER
        (nothing reached the client within the scenario's wait)."""
        if self.status is None:
            return "NO ANSWER"
        return self.status if self.status == "SUCCEEDED" else f"{self.status} {self.reason or ''}".strip()

    @property
    def e2e_ms(self) -> int | None:
        return None if self.received_ms is None else self.received_ms - self.submitted_ms

    @property
    def render_ms(self) -> int:
        return sum(t["render_ms"] for t in self.tasks) or self.timings.get("render_ms", 0)

    @property
    def queue_waits_ms(self) -> list[int]:
        return [t["started_at"] - t["enqueued_at"] for t in self.tasks]


class Collector:
    """Follows the run's completions and frames topics on a thread of its own."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings)
        self.requests: dict[str, RequestTiming] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.ready = threading.Event()

    def expect(self, timing: RequestTiming) -> None:
        with self.lock:
            self.requests[timing.request_id] = timing

    def start(self) -> Collector:
        self.thread.start()
        self.ready.wait(30)
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)

    def done(self) -> int:
        with self.lock:
            return sum(1 for r in self.requests.values() if r.received_ms is not None)

    def wait(self, count: int, timeout_s: float) -> bool:
        """Until ``count`` requests of any kind have their Completion (or ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.done() >= count:
                return True
            time.sleep(0.1)
        return False

    def wait_for(self, request_ids: Iterable[str], timeout_s: float) -> bool:
        """Until every one of ``request_ids`` has its Completion (or ``timeout_s``)."""
        waiting = set(request_ids)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                waiting = {r for r in waiting if self.requests[r].received_ms is None}
            if not waiting:
                return True
            time.sleep(0.1)
        return False

    def _run(self) -> None:
        consumer = make_consumer(
            self.settings, f"bench-{uuid.uuid4().hex}", "bench", **{"fetch.wait.max.ms": 10}
        )
        codec = default_codec()
        topics = [self.topics.completions, *self.topics.all_frames()]
        metadata = consumer.list_topics(timeout=10)
        consumer.assign(
            [TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in metadata.topics[t].partitions]
        )
        self.ready.set()
        try:
            while not self.stop.is_set():
                for msg in consume_available(consumer, 500, 0.05):
                    if msg.error():
                        continue
                    received = now_ms()
                    name, record = codec.decode_any(msg.value())
                    with self.lock:
                        timing = self.requests.get(record["request_id"])
                        if timing is None:
                            continue
                        if name == "Completion":
                            timing.received_ms = timing.received_ms or received
                            timing.status = record["status"]
                            timing.reason = record.get("reason_code")
                            timing.timings = record["timings"]
                            timing.finished_ms = record["finished_at"]
                        else:
                            timing.tasks.append(
                                {
                                    k: record[k]
                                    for k in (
                                        "task_id",
                                        "enqueued_at",
                                        "started_at",
                                        "finished_at",
                                        "render_ms",
                                        "batch_size",
                                        "worker_id",
                                        "accepted_at",
                                        "outcome",
                                    )
                                }
                            )
        finally:
            consumer.close()


class Load:
    """Submits requests through the SDK: at Poisson arrival times (open loop), or all at once."""

    def __init__(self, settings: Settings, collector: Collector, seed: int = 7) -> None:
        self.client = Client(settings)
        self.collector = collector
        self.rng = random.Random(seed)
        self.late_ms: list[float] = []  # how far behind its arrival time each submission went out

    def _submit(self, fields: dict[str, Any]) -> str:
        record = {"request_id": f"b{uuid.uuid4().hex[:20]}", "created_at": now_ms(), **fields}
        frames = record["video"]["num_frames"] if record.get("video") else record.get("num_images", 1)
        self.collector.expect(
            RequestTiming(
                record["request_id"], record.get("priority", "NORMAL"), frames, record["created_at"]
            )
        )
        return self.client.submit_nowait(record)

    def backlog(self, count: int, fields: dict[str, Any]) -> list[str]:
        ids = [self._submit(fields) for _ in range(count)]
        self.client.flush()
        return ids

    def poisson(
        self,
        rate_per_s: float,
        duration_s: float,
        fields: dict[str, Any],
        stop: threading.Event | None = None,
        tenants: Sequence[str] = (),
    ) -> list[str]:
        """Open-loop arrivals at ``rate_per_s`` for ``duration_s``; returns the request ids. With
        ``tenants``, each request comes from one of them at random (a crowd of users)."""
        ids = []
        start = time.monotonic()
        at = self.rng.expovariate(rate_per_s)
        while at < duration_s and not (stop and stop.is_set()):
            wait = start + at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            else:
                self.late_ms.append(-wait * 1000)
            ids.append(self._submit({**fields, "tenant_id": self.rng.choice(tenants)} if tenants else fields))
            at += self.rng.expovariate(rate_per_s)
        self.client.flush()
        return ids

    def steady(self, rate_per_s: float, count: int, fields: dict[str, Any]) -> list[str]:
        """``count`` requests, one every ``1 / rate_per_s`` seconds (a fixed workload, unlike `poisson`)."""
        ids = []
        start = time.monotonic()
        for i in range(count):
            wait = start + i / rate_per_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            ids.append(self._submit(fields))
        self.client.flush()
        return ids

    def close(self) -> None:
        self.client.close()


def image(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "tenant_id": "bench",
        "prompt": "a benchmark image",
        "model": model,
        "width": 64,
        "height": 64,
        "steps": 10,
        "guidance_scale": 7.5,
        **extra,
    }


def outcomes(timings: Iterable[RequestTiming]) -> dict[str, int]:
    """How many requests ended each way (`RequestTiming.outcome`): every request sent is counted."""
    return dict(collections.Counter(t.outcome for t in timings).most_common())


def stage_breakdown(timings: Iterable[RequestTiming]) -> dict[str, dict[str, float | int | None]]:
    """Where each request's time went, stage by stage (p50/p95/p99 per stage, milliseconds)."""
    stages: dict[str, list[float]] = {name: [] for name in STAGES}
    for t in timings:
        if not t.tasks or t.received_ms is None or t.finished_ms is None:
            continue
        first = min(t.tasks, key=lambda task: task["started_at"])
        last = max(t.tasks, key=lambda task: task["finished_at"])
        stages["gatekeeper"].append(first["accepted_at"] - t.submitted_ms)
        stages["render queue"].append(first["started_at"] - first["enqueued_at"])
        stages["render"].append(t.render_ms)
        stages["upload + announce"].append(last["finished_at"] - first["started_at"] - t.render_ms)
        stages["sink"].append(t.finished_ms - last["finished_at"])
        stages["commit + delivery"].append(t.received_ms - t.finished_ms)
    return {name: summary(values) for name, values in stages.items()}


STAGES = (
    "gatekeeper",  # SDK -> broker -> gatekeeper accepts (created_at -> accepted_at)
    "render queue",  # task on the render topic -> its batch starts (enqueued_at -> started_at)
    "render",  # device time (render_ms)
    "upload + announce",  # PNG encode, S3 put, FramesRendered produced (rest of started -> finished_at)
    "sink",  # FramesRendered consumed, assembled, stored, recorded (frames finished_at -> sink decides)
    "commit + delivery",  # the transaction commits and the Completion reaches the client
)
