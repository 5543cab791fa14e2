"""A BENCHMARKING TOOL, not a renderer: a backend that emulates a GPU's timing and draws placeholder frames.

It lets the pipeline (Kafka, scheduling, preemption, assembly) be load-tested at GPU-like service times on
machines without a GPU, with many renderer processes per host. It spends the time by SLEEPING, never by
burning CPU, so emulated GPUs do not compete with the system under test for cores.

Timing model: a batch of ``n`` frames costs ``service_ms_per_frame * (1 + (n - 1) * (1 - batch_efficiency))``
milliseconds in total, spread evenly over the denoising steps (``batch.steps``, or the fixed ``steps``
override). ``batch_efficiency`` 0 (the default) means no gain from batching, a batch of n costs n frames;
1 means extra frames in a batch are free. After each step's sleep ``on_step`` is called, so suspension and
cancellation behave as with the real backend; time spent blocked in the hook is not service time.

Frames are deterministic numpy drawings (colours from the seeds, stripes from the prompt, phase from the
position), so equal specs give equal pixels and different seeds or positions give different ones.

Consumes: a `RenderBatch`. Produces: HxWx3 uint8 arrays. Imports numpy only (never torch, diffusers, PIL).
"""

from __future__ import annotations

import time
import zlib

import numpy as np

from gpu_consumers.backends.base import FrameSpec, RenderBatch, StepHook


def _colour(seed: int) -> np.ndarray:
    # default_rng takes any non-negative int; reduce to the seed's 64-bit pattern first.
    return np.random.default_rng(seed % 2**64).uniform(0.15, 0.95, size=3)


def draw_frame(spec: FrameSpec, width: int, height: int) -> np.ndarray:
    """The placeholder picture for ``spec``: a height x width x 3 uint8 array."""
    t = spec.position
    base = _colour(spec.seed_start) * (1.0 - t) + _colour(spec.seed_end) * t
    # crc32 rather than hash(): str hashes are salted per process, and frames must match across renderers.
    frequency = 2 + zlib.crc32(spec.prompt.encode("utf-8")) % 6
    y = np.linspace(0.0, 1.0, height, dtype=np.float64)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float64)[None, :]
    stripes = 0.5 + 0.5 * np.sin(2.0 * np.pi * (frequency * (x + y) + t))
    shade = 0.55 + 0.3 * stripes + 0.15 * x
    image = shade[:, :, None] * base[None, None, :]
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


class SyntheticBackend:
    """Sleeps like a GPU and returns placeholder frames; see the module docstring for the timing model."""

    def __init__(
        self,
        service_ms_per_frame: float,
        steps: int | None = None,
        name: str = "synthetic",
        max_batch: int = 8,
        batch_efficiency: float = 0.0,
    ) -> None:
        if service_ms_per_frame < 0:
            raise ValueError("service_ms_per_frame must be >= 0")
        if steps is not None and steps < 1:
            raise ValueError("steps must be >= 1")
        if not 0.0 <= batch_efficiency <= 1.0:
            raise ValueError("batch_efficiency must be in [0, 1]")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.name = name
        self.service_ms_per_frame = service_ms_per_frame
        self.steps = steps
        self.batch_efficiency = batch_efficiency
        self._max_batch = max_batch

    def max_batch(self) -> int:
        """The most frames in one call, as configured."""
        return self._max_batch

    def batch_cost_ms(self, frames: int) -> float:
        """Emulated GPU time of a batch of ``frames`` frames, all steps together."""
        return self.service_ms_per_frame * (1.0 + (frames - 1) * (1.0 - self.batch_efficiency))

    def render(self, batch: RenderBatch, on_step: StepHook | None = None) -> list[np.ndarray]:
        """The placeholder frames of ``batch``, after sleeping its emulated time step by step (``on_step``
        after each)."""
        total = self.steps if self.steps is not None else batch.steps
        step_seconds = self.batch_cost_ms(len(batch.frames)) / total / 1000.0
        for done in range(1, total + 1):
            if step_seconds > 0.0:
                time.sleep(step_seconds)
            if on_step is not None:
                on_step(done, total)
        return [draw_frame(spec, batch.width, batch.height) for spec in batch.frames]
