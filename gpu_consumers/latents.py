"""The deterministic latent recipe: seeds and a position in [0, 1] in, starting latents out.

A video's frames are rendered independently (on different renderers, in different batches), yet must form
one smooth clip. So every frame's starting noise is a pure function of ``(seed_start, seed_end, t, shape)``:
the noise of each seed is drawn on the CPU (identical on every device and in every batch), and the frame
walks from the start noise to the end noise by spherical interpolation, which keeps the noise's norm (what
the diffusion model expects) where a straight line would shrink it towards the middle. The prompt walks
from ``prompt`` to ``prompt_end`` by linear interpolation of the text embeddings (`lerp_embeddings`).
An image is the special case ``seed_start == seed_end`` at position 0.

Consumes: int64 seeds, a position, a latent shape (channels, height, width) without a batch dimension.
Produces: float32 CPU tensors; callers move them to their device and dtype.
"""

from __future__ import annotations

import math

import torch

# torch's CPU generator (mt19937) keeps only the low 32 bits of its seed: seeds 7 and 2**32 + 7 would give
# the same noise. Seeds in [0, 2**32) are used as they are, so seed 42 here is seed 42 of the usual
# `torch.Generator("cpu").manual_seed(42)` recipe; every other int64 (or larger) value is reduced to its
# 64-bit pattern and mixed down to 32 bits, so nearby or structured seeds do not collide in a pattern.
_TORCH_SEED_SPACE = 2**32
_U64 = 2**64
_U64_MASK = _U64 - 1
_PARALLEL_DOT = 0.9995


def torch_seed(seed: int) -> int:
    """The value handed to ``Generator.manual_seed`` for a request seed; always in [0, 2**32)."""
    if 0 <= seed < _TORCH_SEED_SPACE:
        return seed
    # splitmix64's finaliser: a bijection on 64-bit values with good avalanche, so the folded 32 bits
    # depend on every bit of the seed.
    z = seed % _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64_MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64_MASK
    z ^= z >> 31
    return z % _TORCH_SEED_SPACE


def noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal float32 noise of ``shape`` for ``seed``, always drawn on the CPU.

    Drawing on the CPU is what makes a seed mean the same picture on every GPU model and on CPU renderers.
    """
    generator = torch.Generator("cpu").manual_seed(torch_seed(seed))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t=0) to ``b`` (t=1), each tensor taken as one flat vector.

    The endpoints are exact (bit for bit copies), so frame 0 of a clip is the start seed's image. Nearly
    parallel vectors fall back to linear interpolation, where the spherical formula divides by ~0.
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone()
    a64 = a.reshape(-1).double()
    b64 = b.reshape(-1).double()
    norms = float(a64.norm() * b64.norm())
    dot = float(a64 @ b64) / norms if norms > 0.0 else 1.0
    if abs(dot) > _PARALLEL_DOT:
        return torch.lerp(a, b, t)
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    # The weights are computed in double precision; the tensors stay in their own dtype.
    w_a = math.sin((1.0 - t) * theta) / sin_theta
    w_b = math.sin(t * theta) / sin_theta
    return a * w_a + b * w_b


def frame_latents(seed_start: int, seed_end: int, t: float, shape: tuple[int, ...]) -> torch.Tensor:
    """Starting latents (float32, CPU, ``shape``) of the frame at position ``t`` between two seeds.

    Depends only on its arguments, never on which other frames share the batch.
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"position must be in [0, 1], got {t}")
    start = noise(seed_start, shape)
    if seed_end == seed_start or t == 0.0:
        return start
    return slerp(start, noise(seed_end, shape), t)


def lerp_embeddings(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Linear interpolation of two text embeddings, exact at both ends."""
    if a.shape != b.shape:
        raise ValueError(f"lerp needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if t == 0.0:
        return a
    if t == 1.0:
        return b
    return torch.lerp(a, b, t)
