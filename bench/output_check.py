"""What the assembler's output check costs on CPU: the nudenet detector and the verdict, as the sink runs it.

``python -m bench.output_check [--model .aigc/models/tiny-sd] [--repeat 50] [--threads 1]`` times
`OutputCheck.check` (one bounded onnxruntime session, as the sink builds it) on 512x512 frames (per image),
then per request on the tiny model's frames: a 64x64 image and a 16-frame 64x64 video, rendered by the
tiny diffusers model when ``--model`` names one (else the synthetic backend's frames at the same size).
Prints wall p50/p95 and CPU p50 in milliseconds; a measurement, not a pass/fail test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from gpu_consumers.backends.base import FrameSpec, RenderBatch
from gpu_consumers.backends.synthetic import draw_frame
from plumbing.output_check import NudeNetDetector, OutputCheck
from plumbing.settings import OutputCheckSettings


def percentiles(samples: Sequence[tuple[float, float]]) -> str:
    """Wall p50/p95 and CPU p50 of (wall, CPU) millisecond samples, as one line."""
    wall = statistics.quantiles([w for w, _ in samples], n=100, method="inclusive")
    cpu = statistics.median(c for _, c in samples)
    return f"wall p50 {wall[49]:.1f} / p95 {wall[94]:.1f} ms, CPU p50 {cpu:.1f} ms (n={len(samples)})"


def timed(run: Callable[[], object], repeat: int) -> list[tuple[float, float]]:
    """Wall and CPU milliseconds of each run: on a shared machine the wall time includes waiting for a
    core, the CPU time does not."""
    run()  # warm-up: the first run allocates onnxruntime's buffers
    samples = []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        samples.append(((time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000))
    return samples


def frames(model: Path | None, size: int, count: int) -> list[np.ndarray]:
    """``count`` frames of a clip (one frame: an image), from the tiny model or the synthetic backend."""
    specs = tuple(
        FrameSpec(11, 12, i / max(1, count - 1), "a paper lantern floating on a lake") for i in range(count)
    )
    if model is None:
        return [draw_frame(spec, size, size) for spec in specs]
    from gpu_consumers.backends.diffusers_backend import DiffusersBackend

    backend = DiffusersBackend(model, "tiny-sd", device="cpu")
    return backend.render(RenderBatch("tiny-sd", size, size, 10, 7.5, None, specs))


def main() -> None:
    """Time the output check on a large image, then on the tiny model's image and video."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="tiny diffusers model folder (aigc models build-tiny)")
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--threads", type=int, default=OutputCheckSettings().threads)
    args = parser.parse_args()
    check = OutputCheck(NudeNetDetector(args.threads), OutputCheckSettings().unsafe_labels)
    print(f"{check.detector.model_version}, {args.threads} thread(s), policy {check.policy_version}")
    big = frames(None, 512, 1)
    print("512x512 image:", percentiles(timed(lambda: check.check(big), args.repeat)))
    source = "tiny model" if args.model else "synthetic"
    image, video = frames(args.model, 64, 1), frames(args.model, 64, 16)
    print(f"64x64 image request ({source}):", percentiles(timed(lambda: check.check(image), args.repeat)))
    clip = timed(lambda: check.check(video), max(5, args.repeat // 5))
    print(f"16-frame 64x64 video request ({source}):", percentiles(clip))


if __name__ == "__main__":
    main()
