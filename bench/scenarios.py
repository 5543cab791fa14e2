"""The benchmark scenarios. Each runs its own pipeline and returns figures (and notes) for the report.

T1 is the tiny diffusers model end to end (issue: pipeline latency); B1-B7 are the scheduling and
throughput suite; GW is the HTTP gateway (bench/gateway.py). Synthetic renderers sleep for their service
time, so their figures measure the pipeline, not a model.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import defaultdict
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.gateway import gw_gateway
from bench.harness import (
    Collector,
    Load,
    RequestTiming,
    image,
    outcomes,
    percentile,
    stage_breakdown,
    steady_rate,
    summary,
)
from bench.realsize import sd15
from infra.pipeline import RunningPipeline, running_pipeline
from plumbing.settings import GatekeeperSettings, ModelSpec, RendererSettings, Settings, Tier
from schemas.records import VideoSpec

UNLIMITED = Tier(requests_per_s=1e6, request_burst=1e6, cost_per_s=1e18, cost_burst=1e18)
SYNTH = "synth"
CROWD = 200  # B3 crowd: LOW tenants, about 1 request/s each at 10x capacity (the default tier allows 20)
BACKLOG_TASKS = 1000  # B3: a standing LOW backlog, 50 s of work for its 4 renderers
LEDGER_SETTLE_S = 3.0  # LEDGER: > librdkafka's statistics interval + a counts file's flush interval


def configure(
    settings: Settings,
    *,
    synthetic: bool,
    max_batch: int = 8,
    batch_wait_ms: float | None = None,
    frames_per_task: int | None = None,
    tiny_model: Path | None = None,
) -> Settings:
    """Scenario settings: an unthrottled bench tenant, and the model the renderers serve."""
    model = (
        ModelSpec(path=Path("/synthetic"), backend="synthetic", max_batch=max_batch)
        if synthetic
        else ModelSpec(path=tiny_model or settings.models["tiny-sd"].path, max_batch=max_batch)
    )
    # One tenant per load, unthrottled and uncapped: the scenarios measure the pipeline, not admission.
    gatekeeper: GatekeeperSettings = settings.gatekeeper.model_copy(
        update={
            "tiers": {**settings.gatekeeper.tiers, "unlimited": UNLIMITED},
            "tenant_tiers": {"bench": "unlimited", "bench-low": "unlimited"},
            "tenant_inflight_cap": {},
        }
    )
    if frames_per_task is not None:
        gatekeeper = gatekeeper.model_copy(update={"frames_per_task": frames_per_task})
    renderer: RendererSettings = settings.renderer
    if batch_wait_ms is not None:
        renderer = renderer.model_copy(update={"batch_wait_ms": batch_wait_ms})
    return settings.model_copy(
        update={
            "models": {SYNTH if synthetic else "tiny-sd": model},
            "gatekeeper": gatekeeper,
            "renderer": renderer,
        }
    )


def _run(
    settings: Settings, renderers: int, synthetic_ms: float | None, name: str
) -> AbstractContextManager[RunningPipeline]:
    """The scenario's own pipeline; its topics and keyspace are dropped at the end."""
    return running_pipeline(
        settings,
        renderers=renderers,
        synthetic_ms=synthetic_ms,
        isolate=f"bench{name}",
        drop=True,
        echo=lambda _: None,
    )


def _finished(timings: list[RequestTiming]) -> list[RequestTiming]:
    return [t for t in timings if t.received_ms is not None and t.status == "SUCCEEDED"]


def t1_tiny_model(settings: Settings, quick: bool) -> dict[str, Any]:
    """End-to-end latency with the tiny diffusers model, one request at a time (no queueing)."""
    count = 10 if quick else 30
    conf = configure(settings, synthetic=False)
    out: dict[str, Any] = {"requests_each": count, "steps": 10, "size": "64x64", "renderers": 1}
    with _run(conf, 1, None, "t1") as pipeline:
        collector = Collector(pipeline.settings).start()
        load = Load(pipeline.settings, collector)
        try:
            for kind, fields in (
                ("image", image("tiny-sd")),
                ("video", image("tiny-sd", video=VideoSpec(num_frames=16, fps=8))),
            ):
                load.backlog(2, fields)  # warm-up: first renders pay for lazy initialisation
                collector.wait(collector.done() + 2, 300)
                before = set(collector.requests)
                for _ in range(count):
                    target = collector.done() + 1
                    load.backlog(1, fields)
                    collector.wait(target, 120)
                timings = _finished([collector.requests[r] for r in set(collector.requests) - before])
                out[kind] = {
                    "stages_ms": stage_breakdown(timings),
                    "e2e_ms": summary([t.e2e_ms for t in timings]),  # type: ignore[misc]
                    "in_model_ms": summary([t.render_ms for t in timings]),
                    "overhead_ms": summary([t.e2e_ms - t.render_ms for t in timings]),  # type: ignore[operator]
                    "assemble_ms": summary([t.timings.assemble_ms for t in timings]),
                }
        finally:
            load.close()
            collector.close()
    return out


def b1_overhead(settings: Settings, quick: bool) -> dict[str, Any]:
    """Pipeline overhead (end to end minus time in the renderer) at 10% and 50% of capacity."""
    renderers, service_ms = 8, 200.0
    capacity = renderers * 1000 / service_ms  # one-frame image requests per second
    duration = 20.0 if quick else 45.0
    conf = configure(settings, synthetic=True, batch_wait_ms=0)
    out: dict[str, Any] = {
        "renderers": renderers,
        "service_ms_per_frame": service_ms,
        "steps": 10,
        "capacity_per_s": capacity,
        "note": "batch wait 0: the synthetic backend gains "
        "nothing from batching, so waiting to batch would only add latency",
    }
    with _run(conf, renderers, service_ms, "b1") as pipeline:
        for share in (0.1, 0.5):
            collector = Collector(pipeline.settings).start()
            load = Load(pipeline.settings, collector)
            try:
                ids = load.poisson(capacity * share, duration, image(SYNTH))
                collector.wait(len(ids), 120)
                timings = _finished(list(collector.requests.values()))
                out[f"load_{int(share * 100)}pct"] = {
                    "stages_ms": stage_breakdown(timings),
                    "rate_per_s": capacity * share,
                    "requests": len(ids),
                    "completed": len(timings),
                    "outcomes": outcomes(collector.requests.values()),
                    "overhead_ms": summary([t.e2e_ms - t.render_ms for t in timings]),  # type: ignore[operator]
                    "e2e_ms": summary([t.e2e_ms for t in timings]),  # type: ignore[misc]
                    "queue_wait_ms": summary([w for t in timings for w in t.queue_waits_ms]),
                    "submit_lateness_ms_p99": percentile(load.late_ms, 99),
                }
            finally:
                load.close()
                collector.close()
    return out


def b2_throughput(settings: Settings, quick: bool) -> dict[str, Any]:
    """Completed image requests per second with 0 ms service time, and where the time goes."""
    count = 1500 if quick else 4000
    renderers = 2
    conf = configure(settings, synthetic=True, batch_wait_ms=5)
    with _run(conf, renderers, 0.0, "b2") as pipeline:
        collector = Collector(pipeline.settings).start()
        load = Load(pipeline.settings, collector)
        try:
            started = time.monotonic()
            load.poisson(2000.0, count / 2000.0, image(SYNTH, steps=1), None)
            submitted_s = time.monotonic() - started
            collector.wait(len(collector.requests), 300)
            timings = _finished(list(collector.requests.values()))
        finally:
            load.close()
            collector.close()
    done = sorted(t.received_ms for t in timings if t.received_ms)
    rate = steady_rate(done)
    stages: dict[str, list[float]] = defaultdict(list)
    for t in timings:
        task = t.tasks[0] if t.tasks else None
        if task is None:
            continue
        stages["gatekeeper (created -> accepted)"].append(task.accepted_at - t.submitted_ms)
        stages["render queue (enqueued -> started)"].append(task.started_at - task.enqueued_at)
        stages["render + upload (started -> frames out)"].append(task.finished_at - task.started_at)
        stages["sink (frames out -> completion to client)"].append((t.received_ms or 0) - task.finished_at)
    return {
        "requests": len(collector.requests),
        "completed": len(timings),
        "outcomes": outcomes(collector.requests.values()),
        "renderers": renderers,
        "submitted_per_s": len(collector.requests) / submitted_s,
        "completed_per_s": rate,
        "stage_ms_p50": {k: percentile(v, 50) for k, v in stages.items()},
        "stage_ms_p99": {k: percentile(v, 99) for k, v in stages.items()},
    }


def b3_priority(settings: Settings, quick: bool) -> dict[str, Any]:
    """High-priority queue wait under a low-priority flood at 10x capacity, against no flood."""
    renderers, service_ms, high_rate = 4, 200.0, 2.0
    capacity = renderers * 1000 / service_ms
    duration = 20.0 if quick else 40.0
    out: dict[str, Any] = {
        "renderers": renderers,
        "service_ms_per_frame": service_ms,
        "steps": 10,
        "high_rate_per_s": high_rate,
        "low_rate_per_s": 10 * capacity,
        "variants": f"baseline: no LOW work; backlog: {BACKLOG_TASKS} LOW tasks queued before HIGH arrives "
        "(the renderers' priority isolation); flood: LOW arriving live at 10x capacity from one unthrottled "
        "tenant (adds the gatekeeper's and sink's cost of answering every shed request); crowd: the same "
        f"flood from {CROWD} tenants of the default tier, each within its own rate limit",
        "outcomes": "every request sent, by how it ended (NO ANSWER: nothing within the scenario's wait); "
        "the percentiles are over the SUCCEEDED ones",
        "max_batch": 1,
        "note": "a preempting task waits for the running batch's next step; the synthetic backend costs a "
        "batch n times a frame, so batching it would only lengthen steps (B5 measures batching)",
    }
    conf = configure(settings, synthetic=True, max_batch=1)
    crowd = [f"bench-crowd-{i}" for i in range(CROWD)]
    for variant in ("baseline", "backlog", "flood", "crowd"):
        with _run(conf, renderers, service_ms, "b3") as pipeline:
            collector = Collector(pipeline.settings).start()
            high_load, low_load = Load(pipeline.settings, collector, 1), Load(pipeline.settings, collector, 2)
            low = image(SYNTH, tenant_id="bench-low", priority="LOW")
            stop = threading.Event()
            flooder = threading.Thread(
                target=low_load.poisson,
                args=(10 * capacity, duration, low, stop, crowd if variant == "crowd" else ()),
                daemon=True,
            )
            try:
                if variant == "backlog":
                    low_load.backlog(BACKLOG_TASKS, low)
                    time.sleep(15)  # admission of the backlog is over: only the renderers are busy
                elif variant in ("flood", "crowd"):
                    flooder.start()
                    time.sleep(3)  # let the backlog build
                high_ids = high_load.poisson(high_rate, duration, image(SYNTH, priority="HIGH"))
                stop.set()
                if flooder.is_alive():
                    flooder.join(30)
                collector.wait_for(high_ids, 60)  # the HIGH ones: LOW completions must not end the wait
                highs = [collector.requests[r] for r in high_ids]
                finished = _finished(highs)
                lows = [t for t in collector.requests.values() if t.priority == "LOW"]
                out[variant] = {
                    "high_requests": len(high_ids),
                    "high_completed": len(finished),
                    "high_outcomes": outcomes(highs),
                    "high_wait_created_to_start_ms": summary(
                        [task.started_at - t.submitted_ms for t in finished for task in t.tasks]
                    ),
                    "high_queue_wait_ms": summary([w for t in finished for w in t.queue_waits_ms]),
                    "high_e2e_ms": summary([t.e2e_ms for t in finished]),  # type: ignore[misc]
                    "high_stages_ms": stage_breakdown(finished),
                    "low_offered": len(lows),
                    "low_outcomes_during_run": outcomes(lows),
                }
            finally:
                stop.set()
                high_load.close()
                low_load.close()
                collector.close()
    return out


def _busy(timings: list[RequestTiming], trim_ms: int = 2000) -> dict[str, float]:
    """Per worker, the share of the window (work waiting all along) its device spent rendering.

    Tasks rendered in one batch share their ``started_at``, and their ``render_ms`` shares add up to the
    batch's device time, so each batch is the interval [started_at, started_at + sum of shares]."""
    tasks = [task for t in timings for task in t.tasks]
    start = min(t.started_at for t in tasks) + trim_ms
    end = max(t.finished_at for t in tasks) - trim_ms
    batches: dict[tuple[str, int], int] = defaultdict(int)
    for task in tasks:
        batches[(task.worker_id, task.started_at)] += task.render_ms
    busy: dict[str, float] = defaultdict(float)
    for (worker, began), device_ms in batches.items():
        busy[worker] += max(0, min(began + device_ms, end) - max(began, start))
    return {worker: value / (end - start) for worker, value in busy.items()}


def b4_busy(settings: Settings, quick: bool) -> dict[str, Any]:
    """Renderer busy fraction while a standing backlog waits."""
    renderers, service_ms = 4, 100.0
    count = 200 if quick else 480
    conf = configure(settings, synthetic=True)
    with _run(conf, renderers, service_ms, "b4") as pipeline:
        collector = Collector(pipeline.settings).start()
        load = Load(pipeline.settings, collector)
        try:
            load.backlog(count, image(SYNTH))
            collector.wait(count, 300)
            timings = _finished(list(collector.requests.values()))
        finally:
            load.close()
            collector.close()
    fractions = _busy(timings)
    return {
        "renderers": renderers,
        "service_ms_per_frame": service_ms,
        "backlog": count,
        "busy_fraction_mean": statistics.fmean(fractions.values()),
        "busy_fraction_min": min(fractions.values()),
        "per_worker": fractions,
    }


def _throughput(timings: list[RequestTiming]) -> float:
    tasks = [task for t in timings for task in t.tasks]
    frames = sum(t.frames for t in timings)
    span = (max(t.finished_at for t in tasks) - min(t.started_at for t in tasks)) / 1000
    return frames / span


def b5_batching(settings: Settings, quick: bool) -> dict[str, Any]:
    """Images per second of the tiny diffusers model at batch 1 against dynamic batching (up to 8)."""
    count = 24 if quick else 64
    out: dict[str, Any] = {"images": count, "size": "64x64", "steps": 10, "renderers": 1}
    for label, max_batch in (("batch_1", 1), ("dynamic_8", 8)):
        conf = configure(settings, synthetic=False, max_batch=max_batch)
        with _run(conf, 1, None, "b5") as pipeline:
            collector = Collector(pipeline.settings).start()
            load = Load(pipeline.settings, collector)
            try:
                load.backlog(count, image("tiny-sd"))
                collector.wait(count, 600)
                timings = _finished(list(collector.requests.values()))
                out[label] = {
                    "images_per_s": _throughput(timings),
                    "mean_batch": statistics.fmean(t.batch_size for r in timings for t in r.tasks),
                }
            finally:
                load.close()
                collector.close()
    out["gain"] = out["dynamic_8"]["images_per_s"] / out["batch_1"]["images_per_s"]
    return out


def b6_video_sink(settings: Settings, quick: bool) -> dict[str, Any]:
    """What assembling a video costs the sink: ms per frame, and the encoder's frames per second."""
    import numpy as np

    from stream_processors.assembler.video import encode_mp4

    per_size = 3 if quick else 8
    out: dict[str, Any] = {}
    conf = configure(settings, synthetic=True, frames_per_task=8)
    with _run(conf, 2, 0.0, "b6") as pipeline:
        collector = Collector(pipeline.settings).start()
        load = Load(pipeline.settings, collector)
        try:
            for frames in (16, 64):
                before = set(collector.requests)
                for _ in range(per_size):
                    target = collector.done() + 1
                    load.backlog(1, image(SYNTH, steps=1, video=VideoSpec(num_frames=frames, fps=8)))
                    collector.wait(target, 120)
                timings = _finished([collector.requests[r] for r in set(collector.requests) - before])
                assemble = [t.timings.assemble_ms for t in timings]
                gradient = np.linspace(0, 255, 64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)
                clip = [np.roll(gradient, i, axis=1) for i in range(frames)]
                encode_mp4(clip, 8)  # warm: the first call imports moviepy and finds ffmpeg
                runs = []
                for _ in range(3):
                    started = time.perf_counter()
                    encode_mp4(clip, 8)
                    runs.append(time.perf_counter() - started)
                encode_s = sorted(runs)[1]
                out[f"{frames}_frames"] = {
                    "assemble_ms": summary(assemble),
                    "assemble_ms_per_frame_p50": (percentile(assemble, 50) or 0) / frames,
                    "encode_fps_64x64": frames / encode_s,  # median of 3, ffmpeg's start-up included
                }
        finally:
            load.close()
            collector.close()
    return out


def b7_scaling(settings: Settings, quick: bool) -> dict[str, Any]:
    """Throughput against renderer count with synthetic 100 ms renderers and a standing backlog."""
    service_ms = 100.0
    counts = (1, 2, 4, 8) if quick else (1, 2, 4, 8, 16)
    per_renderer = 3 if quick else 5  # 32-frame videos per renderer, as 8-frame tasks
    conf = configure(settings, synthetic=True, frames_per_task=8)
    video = image(SYNTH, video=VideoSpec(num_frames=32, fps=8))
    out: dict[str, Any] = {
        "service_ms_per_frame": service_ms,
        "ideal_per_renderer_per_s": 1000 / service_ms,
        "work": "32-frame videos rendered as 8-frame tasks, so the per-frame cost of the rest of the "
        "pipeline stays small next to the renderers' (one-frame images saturate the sink first)",
    }
    for n in counts:
        with _run(conf, n, service_ms, "b7") as pipeline:
            collector = Collector(pipeline.settings).start()
            load = Load(pipeline.settings, collector)
            try:
                load.backlog(n * per_renderer, video)
                collector.wait(n * per_renderer, 600)
                timings = _finished(list(collector.requests.values()))
            finally:
                load.close()
                collector.close()
        out[f"renderers_{n}"] = {"frames_per_s": _throughput(timings), "completed": len(timings)}
    base = out["renderers_1"]["frames_per_s"]
    for n in counts:
        entry = out[f"renderers_{n}"]
        entry["efficiency"] = entry["frames_per_s"] / (n * base)
    return out


@dataclass(frozen=True)
class LedgerWorkload:
    """LEDGER's load: image requests at a steady rate, then 16-frame videos, after an idle window."""

    image_rate: float
    images: int
    video_rate: float
    videos: int
    idle_s: float


LEDGER_QUICK = LedgerWorkload(image_rate=5.0, images=60, video_rate=0.5, videos=5, idle_s=5.0)
LEDGER_FULL = LedgerWorkload(image_rate=10.0, images=300, video_rate=0.5, videos=15, idle_s=10.0)


def ledger(settings: Settings, quick: bool) -> dict[str, Any]:
    """What one image request and one video frame cost: Kafka, Cassandra, S3 and CPU, every process."""
    return run_ledger(settings, LEDGER_QUICK if quick else LEDGER_FULL)


def run_ledger(settings: Settings, work: LedgerWorkload) -> dict[str, Any]:
    """LEDGER with a given workload: an idle window, then the images, then the videos, each read apart."""
    from bench import ledger as book

    service_ms, renderers, frames = 10.0, 2, 16
    conf = configure(settings, synthetic=True, batch_wait_ms=0)
    conf = conf.model_copy(
        update={
            "output_check": conf.output_check.model_copy(update={"enabled": False}),
            "call_counts_dir": conf.home / "call-counts" / f"ledger-{time.strftime('%Y%m%d-%H%M%S')}",
        }
    )
    out: dict[str, Any] = {
        "workload": {
            "renderers": renderers,
            "service_ms_per_frame": service_ms,
            "steps": 10,
            "images": f"{work.images} at {work.image_rate}/s",
            "videos": f"{frames} frames ({conf.gatekeeper.frames_per_task} per task), "
            f"{work.videos} at {work.video_rate}/s",
            "idle_window_s": work.idle_s,
            "output_check": "off (nudenet: ~28 ms CPU per frame, measured apart by bench.output_check)",
        },
    }
    with _run(conf, renderers, service_ms, "ledger") as pipeline:
        # The bench's own clients are left uncounted: the ledger is the pipeline's.
        driver = pipeline.settings.model_copy(update={"call_counts_dir": None})
        collector = Collector(driver).start()
        load = Load(driver, collector)
        stages = {name: int(info["pid"]) for name, info in pipeline.supervisor.snapshot().items()}  # type: ignore[call-overload]
        probe = book.Probe(pipeline.settings, stages)
        try:
            time.sleep(LEDGER_SETTLE_S)  # every process has written its counts once
            idle_from = probe.read()
            time.sleep(work.idle_s)
            image_from = probe.read()
            out["idle"] = {
                "broker_partitions": probe.broker_partitions(),
                **book.idle_rates(idle_from, image_from),
            }
            ids = load.steady(work.image_rate, work.images, image(SYNTH))
            collector.wait(len(ids), 120)
            time.sleep(LEDGER_SETTLE_S)  # the last statistics reach their files
            video_from = probe.read()
            images = _finished([collector.requests[r] for r in ids])
            out["image"] = book.ledger(image_from, video_from, len(images), probe)
            out["image"]["sent"] = len(ids)
            video = image(SYNTH, video=VideoSpec(num_frames=frames, fps=8))
            video_ids = load.steady(work.video_rate, work.videos, video)
            collector.wait(len(ids) + len(video_ids), 180)
            time.sleep(LEDGER_SETTLE_S)
            video_to = probe.read()
            videos = _finished([collector.requests[r] for r in video_ids])
            out["video_frame"] = book.ledger(video_from, video_to, sum(t.frames for t in videos), probe)
            out["video_frame"].update(sent=len(video_ids), completed_videos=len(videos))
            for window in ("image", "video_frame"):
                out[window]["cpu_ms_above_idle"] = book.above_idle(out[window], out["idle"])
            out["restarts"] = {
                name: info["restarts"]
                for name, info in pipeline.supervisor.snapshot().items()
                if info["restarts"]
            }
        finally:
            probe.close()
            load.close()
            collector.close()
    return out


def peer_celery(settings: Settings, quick: bool) -> dict[str, Any]:
    """B1, B2 and B3's workload on Celery 5 + Redis (the peer), printed beside ours in the report."""
    from bench.peer import peer

    return peer(quick)


SCENARIOS = {
    "T1": t1_tiny_model,
    "B1": b1_overhead,
    "B2": b2_throughput,
    "B3": b3_priority,
    "B4": b4_busy,
    "B5": b5_batching,
    "B6": b6_video_sink,
    "B7": b7_scaling,
    "LEDGER": ledger,
    "SD15": sd15,
    "PEER": peer_celery,
    "GW": gw_gateway,
}
