"""The render backend interface: a batch of frames that share a model and settings in, RGB arrays out.

The renderer's Kafka loop and the synthetic backend import this module, so it must stay free of torch and
diffusers: a synthetic renderer process never pays for importing them.

Consumes: nothing (definitions only). Produces: `FrameSpec`, `RenderBatch`, the `StepHook` and `Backend`
protocols, and `RenderOOM`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy

# Scheduler names a batch may ask for; None in a batch means the model folder's own scheduler.
SCHEDULERS = ("ddim", "euler", "dpm", "pndm")
# Latent-diffusion VAEs downsample by 8; the backends assume image sides divisible by it.
SIZE_MULTIPLE = 8


@dataclass(frozen=True)
class FrameSpec:
    """One frame to render: the position ``position`` on the walk from ``seed_start``/``prompt`` to
    ``seed_end``/``prompt_end``. An image is ``seed_start == seed_end`` at position 0."""

    seed_start: int
    seed_end: int
    position: float  # t in [0, 1]
    prompt: str
    prompt_end: str | None = None  # None = same as prompt
    negative_prompt: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.position <= 1.0:
            raise ValueError(f"position must be in [0, 1], got {self.position}")


@dataclass(frozen=True)
class RenderBatch:
    """Frames that share everything below, rendered in one backend call."""

    model: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str | None  # None = the model's own; else one of SCHEDULERS
    frames: tuple[FrameSpec, ...]

    def __post_init__(self) -> None:
        for side, value in (("width", self.width), ("height", self.height)):
            if value <= 0 or value % SIZE_MULTIPLE:
                raise ValueError(f"{side} must be a positive multiple of {SIZE_MULTIPLE}, got {value}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be None or one of {SCHEDULERS}, got {self.scheduler!r}")
        if not self.frames:
            raise ValueError("a batch needs at least one frame")


class StepHook(Protocol):
    """What a backend calls between denoising steps: the renderer's progress, preemption and cancellation."""

    def __call__(self, done: int, total: int) -> None:
        """Called by the backend after each denoising step; ``done`` = steps finished (1..total).

        It may BLOCK (the renderer suspends this batch while more urgent work runs on another thread) or
        RAISE (e.g. a cancellation); a raised exception propagates out of ``render()`` unchanged.
        """


class Backend(Protocol):
    """A loaded model that renders batches of frames; ``name`` is the model it serves."""

    name: str

    def render(self, batch: RenderBatch, on_step: StepHook | None = None) -> list[numpy.ndarray]:
        """One HxWx3 uint8 RGB array per frame of ``batch``, in order.

        Must be re-entrant: ``render`` for another batch may run on a second thread while this call is
        blocked inside ``on_step``, and neither call may change the other's result.
        """
        ...

    def max_batch(self) -> int:
        """The most frames this backend renders in one call."""
        ...


class RenderOOM(Exception):
    """The device ran out of memory for this batch; the renderer splits the batch and retries."""
