"""Render backends behind one interface (`base.Backend`), and `make_backend` to build one by kind.

Importing this package never imports torch or diffusers: a synthetic renderer stays light, and the
diffusers backend's module is imported only when ``make_backend("diffusers", ...)`` asks for it.

Consumes: a kind name and the backend's constructor arguments. Produces: a `Backend`.
"""

from __future__ import annotations

from typing import Any

from gpu_consumers.backends.base import (
    SCHEDULERS,
    Backend,
    FrameSpec,
    RenderBatch,
    RenderOOM,
    StepHook,
)

KINDS = ("diffusers", "synthetic")

__all__ = [
    "KINDS",
    "SCHEDULERS",
    "Backend",
    "FrameSpec",
    "RenderBatch",
    "RenderOOM",
    "StepHook",
    "make_backend",
]


def make_backend(kind: str, **kwargs: Any) -> Backend:
    """A backend of ``kind`` ("diffusers" or "synthetic") built with ``kwargs``, imported on demand.

    "diffusers": ``model_path``, ``name``, optional ``device`` and ``max_batch`` (`DiffusersBackend`).
    "synthetic": ``service_ms_per_frame``, optional ``steps``, ``name``, ``max_batch``, ``batch_efficiency``
    (`SyntheticBackend`, a benchmarking tool).
    """
    if kind == "diffusers":
        from gpu_consumers.backends.diffusers_backend import DiffusersBackend

        return DiffusersBackend(**kwargs)
    if kind == "synthetic":
        from gpu_consumers.backends.synthetic import SyntheticBackend

        return SyntheticBackend(**kwargs)
    raise ValueError(f"unknown backend kind {kind!r}; expected one of {KINDS}")
