"""`aigc demo`: the main job, end to end, on this machine.

Brings the local infrastructure up if it is not running, installs the demo's trained shapes model (the
weights shipped in gpu_consumers/shapes/model) unless AIGC_MODELS names other models, starts the pipeline
(gatekeeper, one renderer, assembler, the HTTP gateway) under the supervisor, submits two image requests
(an English and a Chinese prompt) and one 16-frame video request that walks from one prompt to another
through the SDK, shows live progress from the status topic (bars on a terminal, one line per state change
in a file or a pipe), prints each completion, downloads the outputs, lays them out on one contact sheet,
says where they are and prints the web console's URL (with an API key of the demo tenant). Whatever it
started, it stops at the end; with ``--keep`` the pipeline and the console keep running.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from infra.launcher import down, status, up
from infra.pipeline import PipelineNotReady, RunningPipeline, running_pipeline
from infra.prometheus_server import prometheus_url
from plumbing.blobs import BlobStore
from plumbing.clock import now_ms
from plumbing.settings import ModelSpec, Settings
from plumbing.supervisor import Supervisor
from producers.cli import format_completion
from producers.client import Client
from producers.metrics_summary import print_summary
from producers.progress import progress_view
from schemas.records import Completion, GenerationRequest, VideoSpec

TENANT = "demo"
IMAGE_PROMPT = "a big red circle on the left on a blue background"
CHINESE_PROMPT = "黑色背景上的一个黄色三角形"
VIDEO_PROMPTS = (
    "a big red circle in the middle on a black background",
    "a big blue circle in the middle on a black background",
)
DEMO_MODEL = "shapes-sd"


def _say(text: str) -> None:
    """Print a step's heading."""
    print(f"\n== {text}", flush=True)


def demo_settings(settings: Settings) -> Settings:
    """The demo's settings: the trained shapes model, unless the registry (AIGC_MODELS) was set to others."""
    if settings.models != Settings.model_fields["models"].default_factory():  # type: ignore[call-arg,misc]
        return settings
    spec = ModelSpec(path=settings.home / "models" / DEMO_MODEL, max_batch=4)
    return settings.model_copy(update={"models": {DEMO_MODEL: spec}})


def ensure_models(settings: Settings) -> None:
    """Install the shapes model or build the tiny one wherever the registry points at a missing folder."""
    for name, spec in settings.models.items():
        if spec.backend != "diffusers" or (spec.path / "model_index.json").exists():
            continue
        verb = "install-shapes" if name == DEMO_MODEL else "build-tiny"
        what = "the trained shapes model" if name == DEMO_MODEL else "the tiny random-weight model"
        print(f"{name}: putting {what} into {spec.path}", flush=True)
        subprocess.run([sys.executable, "-m", "aigc", "models", verb, str(spec.path)], check=True)


def demo_requests(model: str) -> list[GenerationRequest]:
    """The demo's requests, created now: two pictures of an English prompt, one of a Chinese prompt, and a
    16-frame clip from one prompt to another.

    The shapes model draws 64x64 scenes; the clip keeps one seed for its whole length, so what changes
    from frame to frame is what the prompt says.
    """

    def image(prompt: str, seed: int, label: str, num_images: int = 1) -> GenerationRequest:
        return GenerationRequest(
            request_id=uuid.uuid4().hex,
            tenant_id=TENANT,
            kind="IMAGE",
            prompt=prompt,
            model=model,
            width=64,
            height=64,
            steps=25,
            guidance_scale=7.5,
            num_images=num_images,
            seed=seed,
            priority="HIGH",
            labels={"demo": label},
            created_at=now_ms(),
        )

    return [
        image(IMAGE_PROMPT, 7, "image", num_images=2),
        image(CHINESE_PROMPT, 3, "image-zh"),
        GenerationRequest(
            request_id=uuid.uuid4().hex, tenant_id=TENANT, kind="VIDEO", prompt=VIDEO_PROMPTS[0],
            model=model, width=64, height=64, steps=20, guidance_scale=7.5, seed=5, priority="NORMAL",
            labels={"demo": "video"},
            video=VideoSpec(num_frames=16, fps=8, prompt_end=VIDEO_PROMPTS[1], seed_end=5),
            created_at=now_ms(),
        ),
    ]  # fmt: skip


def follow(client: Client, requests: dict[str, GenerationRequest], since_ms: int, timeout_s: float,
           supervisor: Supervisor) -> dict[str, Completion]:  # fmt: skip
    """Progress from status events until every request has its completion: bars on a terminal, one
    line per state change in a file or a pipe. The supervisor is polled twice a second meanwhile (not
    per event), so a stage that exits while no event comes is restarted all the same."""
    totals = {}
    for request_id, req in requests.items():
        frames = req.video.num_frames if req.video else req.num_images
        label = f"{'video' if req.video else 'image'} {request_id[:8]}"
        totals[request_id] = (label, frames * req.steps)
    view = progress_view(totals)
    done_by_task: dict[str, dict[str | None, int]] = {rid: {} for rid in requests}
    completions: dict[str, Completion] = {}
    deadline = time.monotonic() + timeout_s
    with _supervising(supervisor):
        for event in client.subscribe(request_ids=list(requests), since_ms=since_ms, timeout_s=timeout_s):
            rid, record = event.request_id, event.record
            if rid in completions:
                continue  # a status event that lost the race with its completion (another topic)
            if isinstance(record, Completion):
                completions[rid] = record
                succeeded = record.status == "SUCCEEDED"
                view.update(rid, record.status, totals[rid][1] if succeeded else None)
            elif record.state == "RUNNING" and record.progress:
                done_by_task[rid][record.task_id] = record.progress.done
                view.update(rid, "RUNNING", sum(done_by_task[rid].values()))
            else:
                view.update(rid, record.state)
            if len(completions) == len(requests) or time.monotonic() > deadline:
                break
    view.close()
    return completions


@contextlib.contextmanager
def _supervising(supervisor: Supervisor) -> Iterator[None]:
    """Poll ``supervisor`` from a thread while the block runs."""
    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(0.5):
            supervisor.poll()

    thread = threading.Thread(target=keep, name="supervisor", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def download(settings: Settings, completion: Completion, out_dir: Path) -> list[Path]:
    """The completion's outputs, fetched from S3 into ``out_dir/<request_id>/``; their paths."""
    blobs = BlobStore(settings.s3)
    folder = out_dir / completion.request_id
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for output in completion.outputs:
        bucket, _, key = output.uri.removeprefix("s3://").partition("/")
        path = folder / key.rsplit("/", 1)[-1]
        path.write_bytes(blobs.get(bucket, key))
        paths.append(path)
    return paths


def run_demo(settings: Settings, out_dir: Path, keep: bool = False, timeout_s: float = 600.0) -> int:
    """`aigc demo` (see the module docstring); the exit status: 0 when every request succeeded."""
    settings = demo_settings(settings)
    _say("infrastructure: Kafka (KRaft), Cassandra, S3Proxy on 127.0.0.1")
    was_running = all(s.ready for s in status(settings))
    up(settings)
    try:
        _say("models")
        ensure_models(settings)
        _say("pipeline: gatekeeper, renderer, assembler, gateway")
        with running_pipeline(
            settings, webhooks=settings.webhooks.enabled, gateway=settings.gateway.enabled
        ) as pipeline:
            code = _submit_and_show(pipeline, out_dir, timeout_s)
            console = console_url(pipeline.settings)
            if console:
                print(f"\n  web console: {console}")
            if keep:
                _keep(pipeline)
            return code
    except PipelineNotReady as exc:
        print(exc)
        return 1
    finally:
        if not keep and not was_running:
            _say("stopping the infrastructure")
            down(settings)


def _submit_and_show(pipeline: RunningPipeline, out_dir: Path, timeout_s: float) -> int:
    settings = pipeline.settings
    model = next(iter(settings.models))
    _say("submitting two image requests (2 images, English; 1 image, Chinese) and one 16-frame video request")
    since = now_ms()
    started_s = time.time()
    with Client(settings) as client:
        requests = {client.submit(req): req for req in demo_requests(model)}
        for request_id, req in requests.items():
            print(f"{request_id}: {'video' if req.video else 'image'} - {req.prompt!r}")
        completions = follow(client, requests, since - 1000, timeout_s, pipeline.supervisor)
    _say("completions")
    for completion in completions.values():
        print(format_completion(completion))
    missing = set(requests) - set(completions)
    if missing:
        print(f"no completion within {timeout_s:.0f} s for {', '.join(sorted(missing))}")
        return 1
    _say(f"outputs downloaded to {out_dir.resolve()}")
    downloaded: list[Path] = []
    for completion in completions.values():
        for path in download(settings, completion, out_dir):
            print(f"  {path}")
            downloaded.append(path)
    print(f"  all of them on one page: {contact_sheet(downloaded, out_dir / 'demo-output.jpg')}")
    print_summary(settings, started_s - 1)
    print(
        "\n`aigc get <request_id>` shows a request's record in Cassandra, `aigc trace <request_id>` its "
        f"timeline; stage logs are in {pipeline.log_dir}"
    )
    return 0 if all(c.status == "SUCCEEDED" for c in completions.values()) else 1


def contact_sheet(paths: list[Path], out: Path, cell: int = 128, columns: int = 8) -> Path:
    """The images (first rows) and each video's frames (next rows) in one JPEG, each picture ``cell`` px."""
    import cv2
    import numpy as np

    pictures: list[np.ndarray] = []
    rows: list[list[np.ndarray]] = []
    for path in paths:
        if path.suffix == ".mp4":
            capture = cv2.VideoCapture(str(path))
            frames = []
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                frames.append(frame)
            capture.release()
            rows += [frames[i : i + columns] for i in range(0, len(frames), columns)]
        else:
            picture = cv2.imread(str(path))
            if picture is not None:
                pictures.append(picture)
    rows = [pictures[i : i + columns] for i in range(0, len(pictures), columns)] + rows
    gap = 4
    width = columns * (cell + gap)
    lines = []
    for row in rows:
        line = np.full((cell + gap, width, 3), 255, np.uint8)
        for i, picture in enumerate(row):
            x = i * (cell + gap)
            line[:cell, x : x + cell] = cv2.resize(picture, (cell, cell), interpolation=cv2.INTER_NEAREST)
        lines.append(line)
    cv2.imwrite(str(out), np.vstack(lines), [cv2.IMWRITE_JPEG_QUALITY, 92])
    return out


def console_url(settings: Settings) -> str | None:
    """The gateway's console, with a fresh API key of the demo tenant in its fragment (the browser keeps
    it; a fragment never reaches a server or its logs); None when the gateway is switched off."""
    if not settings.gateway.enabled:
        return None
    from plumbing.metadata import connect
    from producers.gateway.keys import KeyStore

    cluster, session = connect(settings.cassandra)
    try:
        _, key = KeyStore(session, settings.cassandra.keyspace).create(TENANT, label="aigc demo")
    finally:
        cluster.shutdown()
    gw = settings.gateway
    return f"{gw.public_url or f'http://{gw.host}:{gw.port}'}/console/#key={key}"


def _keep(pipeline: RunningPipeline) -> None:
    """Leave the pipeline running (restarting what dies) until Ctrl-C, for a person to look at it."""
    settings = pipeline.settings
    _say("the pipeline keeps running until Ctrl-C")
    print(f"  Prometheus: {prometheus_url(settings)}   (alerts: {prometheus_url(settings)}/alerts)")
    print("  live view:  aigc top        one request:  aigc trace <request_id>      submit: aigc submit ...")
    if settings.gateway.enabled:
        gw = settings.gateway
        print(f"  console:    http://{gw.host}:{gw.port}/console/ (the demo's key is in the URL above)")
    try:
        while True:
            pipeline.supervisor.poll()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print()
