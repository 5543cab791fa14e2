"""The latent recipe: seeded noise, slerp, per-frame latents, embedding interpolation."""

from __future__ import annotations

import math

import pytest
import torch

from gpu_consumers.latents import frame_latents, lerp_embeddings, noise, slerp, torch_seed

SHAPE = (4, 8, 8)


def test_noise_is_deterministic_float32_standard_normal() -> None:
    a = noise(1234, SHAPE)
    assert a.dtype == torch.float32
    assert a.device.type == "cpu"
    assert a.shape == SHAPE
    assert torch.equal(a, noise(1234, SHAPE))
    assert not torch.equal(a, noise(1235, SHAPE))
    big = noise(7, (64, 64, 64))
    assert abs(float(big.mean())) < 0.02
    assert abs(float(big.std()) - 1.0) < 0.02


def test_noise_ignores_global_rng_state() -> None:
    torch.manual_seed(0)
    first = noise(99, SHAPE)
    torch.manual_seed(12345)
    torch.randn(1000)  # advance the global generator
    assert torch.equal(first, noise(99, SHAPE))


def test_small_seeds_match_the_usual_cpu_generator_recipe() -> None:
    # Seed 42 here is seed 42 of `torch.Generator("cpu").manual_seed(42)`, as diffusers examples use it.
    expected = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(42))
    assert torch.equal(noise(42, SHAPE), expected)


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**63 - 1, 2**63, 2**64 - 1, 2**70, 2**32, -12345])
def test_any_int_seed_maps_to_a_valid_generator_seed(seed: int) -> None:
    value = torch_seed(seed)
    assert 0 <= value < 2**32
    assert value == torch_seed(seed)
    assert noise(seed, SHAPE).shape == SHAPE


def test_seed_mapping_uses_the_int64_bit_pattern_and_all_64_bits() -> None:
    # -1 and 2**64 - 1 are the same int64 bit pattern.
    assert torch.equal(noise(-1, SHAPE), noise(2**64 - 1, SHAPE))
    # torch's CPU generator keeps only the low 32 bits of a seed: without folding the high bits in,
    # these pairs would be identical.
    assert not torch.equal(noise(2**32 + 7, SHAPE), noise(7, SHAPE))
    assert not torch.equal(noise(-1, SHAPE), noise(2**32 - 1, SHAPE))
    assert not torch.equal(noise(2**40, SHAPE), noise(0, SHAPE))
    assert not torch.equal(noise(-5, SHAPE), noise(5, SHAPE))


def test_slerp_endpoints_are_bit_exact() -> None:
    a, b = noise(1, SHAPE), noise(2, SHAPE)
    assert torch.equal(slerp(a, b, 0.0), a)
    assert torch.equal(slerp(a, b, 1.0), b)
    assert slerp(a, b, 0.0).dtype == a.dtype


def test_slerp_keeps_the_norm_where_lerp_shrinks_it() -> None:
    a, b = noise(10, (4, 32, 32)), noise(11, (4, 32, 32))
    expected = (float(a.norm()) + float(b.norm())) / 2
    middle = slerp(a, b, 0.5)
    assert middle.shape == a.shape
    assert abs(float(middle.norm()) / expected - 1.0) < 0.05
    # Two independent Gaussians are nearly orthogonal: their midpoint has ~1/sqrt(2) of the norm.
    assert float(torch.lerp(a, b, 0.5).norm()) / expected < 0.75
    for t in (0.1, 0.3, 0.7, 0.9):
        assert abs(float(slerp(a, b, t).norm()) / expected - 1.0) < 0.05


def test_slerp_is_continuous_towards_the_ends() -> None:
    a, b = noise(3, SHAPE), noise(4, SHAPE)
    assert torch.allclose(slerp(a, b, 1e-6), a, atol=1e-4)
    assert torch.allclose(slerp(a, b, 1 - 1e-6), b, atol=1e-4)


def test_slerp_of_parallel_vectors_falls_back_to_lerp() -> None:
    a = noise(5, SHAPE)
    b = a * 2.0
    result = slerp(a, b, 0.25)
    assert torch.isfinite(result).all()
    assert torch.allclose(result, torch.lerp(a, b, 0.25))


def test_slerp_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shapes"):
        slerp(noise(1, (4, 8, 8)), noise(2, (4, 8, 16)), 0.5)


def test_frame_latents_walk_from_start_to_end_seed() -> None:
    start, end = noise(100, SHAPE), noise(200, SHAPE)
    assert torch.equal(frame_latents(100, 200, 0.0, SHAPE), start)
    assert torch.equal(frame_latents(100, 200, 1.0, SHAPE), end)
    middle = frame_latents(100, 200, 0.5, SHAPE)
    assert not torch.equal(middle, start)
    assert not torch.equal(middle, end)
    assert torch.equal(middle, slerp(start, end, 0.5))
    # An image: the same seed at both ends is that seed's noise at any position.
    assert torch.equal(frame_latents(100, 100, 0.7, SHAPE), start)


def test_frame_latents_do_not_depend_on_batch_composition() -> None:
    alone = frame_latents(1, 2, 0.25, SHAPE)
    frames = [(9, 9, 0.0), (1, 2, 0.25), (5, 6, 0.5), (1, 2, 0.75)]
    batch = torch.stack([frame_latents(s, e, t, SHAPE) for s, e, t in frames])
    reordered = torch.stack([frame_latents(s, e, t, SHAPE) for s, e, t in reversed(frames)])
    assert torch.equal(batch[1], alone)
    assert torch.equal(reordered[2], alone)


@pytest.mark.parametrize("t", [-0.1, 1.1, math.nan])
def test_frame_latents_reject_positions_outside_0_1(t: float) -> None:
    with pytest.raises(ValueError, match="position"):
        frame_latents(1, 2, t, SHAPE)


def test_lerp_embeddings() -> None:
    a = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    b = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(lerp_embeddings(a, b, 0.0), a)
    assert torch.equal(lerp_embeddings(a, b, 1.0), b)
    assert torch.allclose(lerp_embeddings(a, b, 0.5), (a + b) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        lerp_embeddings(a, b[:, :10], 0.5)
