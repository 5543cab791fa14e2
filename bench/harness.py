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
from dataclasses import dataclass, field, replace

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from plumbing.clock import now_ms
from plumbing.kafka_clients import consume_available, make_consumer
from plumbing.settings import Settings
from plumbing.topics import Topics
from producers.client import Client
from schemas.codec import default_codec
from schemas.records import Completion, FramesRendered, GenerationRequest, Priority, Timings, VideoSpec


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
    """Count, p50, p95, p99 and max of ``values`` (None for no values)."""
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
    }


@dataclass
class RequestTiming:
    """One request of a run: when the client sent and heard of it, and what the stages reported."""

    request_id: str
    priority: str
    frames: int
    submitted_ms: int  # created_at, on the client
    received_ms: int | None = None  # when the Completion reached the client
    status: str | None = None
    reason: str | None = None  # the Completion's reason_code
    timings: Timings = field(default_factory=Timings)  # the Completion's (zeros until it arrives)
    finished_ms: int | None = None  # when the sink decided (the Completion's finished_at)
    tasks: list[FramesRendered] = field(default_factory=list)  # one per task

    @property
    def outcome(self) -> str:
        """What became of the request: SUCCEEDED, the status and reason of any other end, or NO ANSWER
        (nothing reached the client within the scenario's wait)."""
        if self.status is None:
            return "NO ANSWER"
        return self.status if self.status == "SUCCEEDED" else f"{self.status} {self.reason or ''}".strip()

    @property
    def e2e_ms(self) -> int | None:
        """From created_at to the Completion reaching the client; None without one."""
        return None if self.received_ms is None else self.received_ms - self.submitted_ms

    @property
    def render_ms(self) -> int:
        """Device time over the request's tasks (else the Completion's render_ms)."""
        return sum(t.render_ms for t in self.tasks) or self.timings.render_ms

    @property
    def queue_waits_ms(self) -> list[int]:
        """Each task's wait on its render topic (enqueued_at to started_at)."""
        return [t.started_at - t.enqueued_at for t in self.tasks]


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
        """Follow ``timing``'s request: its records are kept from now on."""
        with self.lock:
            self.requests[timing.request_id] = timing

    def start(self) -> Collector:
        """Start following the topics; returns once the partitions are assigned (or after 30 s)."""
        self.thread.start()
        self.ready.wait(30)
        return self

    def close(self) -> None:
        """Stop following the topics."""
        self.stop.set()
        self.thread.join(10)

    def done(self) -> int:
        """How many followed requests have their Completion."""
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
                    record = codec.read_any(msg.value())
                    if isinstance(record, Completion | FramesRendered):
                        self._record(record, received)
        finally:
            consumer.close()

    def _record(self, record: Completion | FramesRendered, received_ms: int) -> None:
        """Keep what ``record`` says about a followed request (nothing for any other request)."""
        with self.lock:
            timing = self.requests.get(record.request_id)
            if timing is None:
                return
            if isinstance(record, Completion):
                timing.received_ms = timing.received_ms or received_ms
                timing.status = record.status
                timing.reason = record.reason_code
                timing.timings = record.timings
                timing.finished_ms = record.finished_at
            else:
                timing.tasks.append(record)


class Load:
    """Submits requests through the SDK: at Poisson arrival times (open loop), or all at once."""

    def __init__(self, settings: Settings, collector: Collector, seed: int = 7) -> None:
        self.client = Client(settings)
        self.collector = collector
        self.rng = random.Random(seed)
        self.late_ms: list[float] = []  # how far behind its arrival time each submission went out

    def _submit(self, template: GenerationRequest) -> str:
        record = replace(template, request_id=f"b{uuid.uuid4().hex[:20]}", created_at=now_ms())
        frames = record.video.num_frames if record.video else record.num_images
        self.collector.expect(RequestTiming(record.request_id, record.priority, frames, record.created_at))
        return self.client.submit_nowait(record)

    def backlog(self, count: int, template: GenerationRequest) -> list[str]:
        """``count`` requests like ``template`` at once; returns their ids once all are acknowledged."""
        ids = [self._submit(template) for _ in range(count)]
        self.client.flush()
        return ids

    def poisson(
        self,
        rate_per_s: float,
        duration_s: float,
        template: GenerationRequest,
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
            ids.append(
                self._submit(replace(template, tenant_id=self.rng.choice(tenants)) if tenants else template)
            )
            at += self.rng.expovariate(rate_per_s)
        self.client.flush()
        return ids

    def steady(self, rate_per_s: float, count: int, template: GenerationRequest) -> list[str]:
        """``count`` requests, one every ``1 / rate_per_s`` seconds (a fixed workload, unlike `poisson`)."""
        ids = []
        start = time.monotonic()
        for i in range(count):
            wait = start + i / rate_per_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            ids.append(self._submit(template))
        self.client.flush()
        return ids

    def close(self) -> None:
        """Close the SDK client (its producer)."""
        self.client.close()


def image(
    model: str,
    *,
    tenant_id: str = "bench",
    priority: Priority = "NORMAL",
    steps: int = 10,
    video: VideoSpec | None = None,
) -> GenerationRequest:
    """The bench's request template: a 64x64 image (a video with ``video``); `Load` gives each copy its
    own request_id and created_at."""
    return GenerationRequest(
        request_id="",
        tenant_id=tenant_id,
        priority=priority,
        kind="VIDEO" if video else "IMAGE",
        prompt="a benchmark image",
        model=model,
        width=64,
        height=64,
        steps=steps,
        guidance_scale=7.5,
        video=video,
        created_at=0,
    )


def outcomes(timings: Iterable[RequestTiming]) -> dict[str, int]:
    """How many requests ended each way (`RequestTiming.outcome`): every request sent is counted."""
    return dict(collections.Counter(t.outcome for t in timings).most_common())


def stage_breakdown(timings: Iterable[RequestTiming]) -> dict[str, dict[str, float | int | None]]:
    """Where each request's time went, stage by stage (p50/p95/p99 per stage, milliseconds)."""
    stages: dict[str, list[float]] = {name: [] for name in STAGES}
    for t in timings:
        if not t.tasks or t.received_ms is None or t.finished_ms is None:
            continue
        first = min(t.tasks, key=lambda task: task.started_at)
        last = max(t.tasks, key=lambda task: task.finished_at)
        stages["gatekeeper"].append(first.accepted_at - t.submitted_ms)
        stages["render queue"].append(first.started_at - first.enqueued_at)
        stages["render"].append(t.render_ms)
        stages["upload + announce"].append(last.finished_at - first.started_at - t.render_ms)
        stages["sink"].append(t.finished_ms - last.finished_at)
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
