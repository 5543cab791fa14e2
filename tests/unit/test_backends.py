"""The tiny model, the diffusers backend (rendering, interpolation, step hooks, preemption) and the
synthetic benchmarking backend."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gpu_consumers.backends import RenderBatch, RenderOOM, make_backend
from gpu_consumers.backends.base import FrameSpec, StepHook
from gpu_consumers.backends.diffusers_backend import DiffusersBackend
from gpu_consumers.backends.synthetic import SyntheticBackend
from gpu_consumers.models import MARKER, build_tiny

MODEL = "tiny-sd"
REPO = Path(__file__).resolve().parents[2]
WAIT_S = 120.0


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread() -> Iterator[None]:
    # The tiny model's kernels are too small to gain from a second thread, and on a busy 2-core machine
    # OpenMP threads waiting for a descheduled peer turn 0.1 s renders into multi-second stalls.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture(scope="module")
def backend(tiny_path: Path) -> DiffusersBackend:
    return DiffusersBackend(tiny_path, MODEL, device="cpu")


def image_batch(
    seeds: tuple[int, ...],
    prompt: str = "a red fox in the snow",
    *,
    steps: int = 4,
    guidance_scale: float = 7.5,
    scheduler: str | None = None,
    size: int = 64,
) -> RenderBatch:
    frames = tuple(FrameSpec(seed, seed, 0.0, prompt) for seed in seeds)
    return RenderBatch(MODEL, size, size, steps, guidance_scale, scheduler, frames)


def with_frames(frames: tuple[FrameSpec, ...], steps: int = 4) -> RenderBatch:
    return RenderBatch(MODEL, 64, 64, steps, 7.5, None, frames)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))


# --- the tiny model -------------------------------------------------------------------------------


def test_tiny_model_loads_with_plain_diffusers(tiny_path: Path) -> None:
    from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_path, local_files_only=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.in_channels == 4
    assert pipe.safety_checker is None
    generic = DiffusionPipeline.from_pretrained(tiny_path, local_files_only=True)
    assert isinstance(generic, StableDiffusionPipeline)
    marker = json.loads((tiny_path / MARKER).read_text())
    assert marker == {"name": "tiny-sd", "kind": "tiny-random", "seed": 0}


@pytest.mark.parametrize("text", ["一只猫在月球上", "a cat in SPACE 🐱 émigré"])
def test_tokenizer_handles_any_utf8_and_text_encoder_pools_at_eos(tiny_path: Path, text: str) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_path, local_files_only=True)
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    assert tokenizer.model_max_length == 77
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id
    # The unknown token is <|endoftext|>: no inner token may be it, every byte has its own entry.
    assert tokenizer.eos_token_id not in ids[1:-1]
    assert len(ids) > 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == text.lower()
    assert encoder.config.vocab_size >= len(tokenizer)
    assert encoder.config.eos_token_id == tokenizer.eos_token_id
    padded = tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = encoder(padded)
    eos_at = len(ids) - 1
    assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, eos_at])


def test_build_tiny_is_idempotent_atomic_and_seeded(tiny_path: Path, tmp_path: Path) -> None:
    assert build_tiny(tiny_path, seed=0) == tiny_path  # already there: left as it is
    with pytest.raises(FileExistsError):
        build_tiny(tiny_path, seed=1)
    again = build_tiny(tmp_path / "again", seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no scratch folders left behind
    for part in ("unet", "vae", "text_encoder"):
        (weights,) = (tiny_path / part).glob("*.safetensors")
        assert weights.read_bytes() == (again / part / weights.name).read_bytes()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        build_tiny(tmp_path / "foreign")
    assert (tmp_path / "foreign" / "keep.txt").exists()


# --- the diffusers backend ------------------------------------------------------------------------


def test_render_shapes_determinism_and_seeds(backend: DiffusersBackend) -> None:
    assert backend.dtype == torch.float32
    first = backend.render(image_batch((1, 2)))
    assert len(first) == 2
    for image in first:
        assert image.shape == (64, 64, 3)
        assert image.dtype == np.uint8
        assert image.std() > 1.0  # not a flat (NaN-turned-black) picture
    second = backend.render(image_batch((1, 2)))
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not np.array_equal(first[0], first[1])
    wide = backend.render(RenderBatch(MODEL, 96, 48, 2, 7.5, None, (FrameSpec(3, 3, 0.0, "x"),)))
    assert wide[0].shape == (48, 96, 3)


def test_video_frames_interpolate_and_end_frames_equal_images(backend: DiffusersBackend) -> None:
    walk = [FrameSpec(10, 20, t, "a cat", "a dog") for t in (0.0, 0.5, 1.0)]
    video = backend.render(with_frames(tuple(walk)))
    assert not np.array_equal(video[0], video[1])
    assert not np.array_equal(video[1], video[2])
    assert not np.array_equal(video[0], video[2])
    # The same batch size and neighbours, with the ends replaced by plain images of each seed and prompt.
    images = backend.render(
        with_frames((FrameSpec(10, 10, 0.0, "a cat"), walk[1], FrameSpec(20, 20, 0.0, "a dog")))
    )
    assert np.array_equal(images[0], video[0])
    assert np.array_equal(images[1], video[1])
    assert np.array_equal(images[2], video[2])


def test_prompts_negative_prompts_and_guidance_change_the_image(backend: DiffusersBackend) -> None:
    frames = (
        FrameSpec(5, 5, 0.5, "a cat"),
        FrameSpec(5, 5, 0.5, "a cat", "a dog"),
        FrameSpec(5, 5, 0.5, "a cat", None, "blurry"),
        FrameSpec(5, 5, 0.5, "a cat", "a cat", ""),  # same as the first, spelled out
    )
    out = backend.render(with_frames(frames))
    assert not np.array_equal(out[0], out[1])
    assert not np.array_equal(out[0], out[2])
    assert np.array_equal(out[0], out[3])
    unguided = backend.render(image_batch((5,), "a cat", guidance_scale=1.0))
    guided = backend.render(image_batch((5,), "a cat", guidance_scale=7.5))
    assert unguided[0].shape == guided[0].shape == (64, 64, 3)
    assert not np.array_equal(unguided[0], guided[0])


def test_on_step_is_called_after_every_step(backend: DiffusersBackend) -> None:
    recorder = Recorder()
    backend.render(image_batch((1,), steps=5), recorder)
    assert recorder.calls == [(i, 5) for i in range(1, 6)]


def test_a_raising_hook_propagates_unchanged(backend: DiffusersBackend) -> None:
    class Cancelled(Exception):
        pass

    error = Cancelled("request cancelled")
    seen: list[int] = []

    def hook(done: int, total: int) -> None:
        seen.append(done)
        if done == 2:
            raise error

    with pytest.raises(Cancelled) as caught:
        backend.render(image_batch((1,)), hook)
    assert caught.value is error
    assert seen == [1, 2]  # stopped at the step that raised
    assert backend.render(image_batch((1,)))[0].shape == (64, 64, 3)  # the backend still works


def test_step_level_suspension_is_bit_identical(backend: DiffusersBackend) -> None:
    batch_a = image_batch((1, 2), "a red fox in the snow")
    # B differs in everything a shared scheduler or pipeline object would leak: seeds, prompt, step
    # count (timesteps), guidance scale and batch size.
    batch_b = image_batch((7, 8, 9), "the blue sea at night", steps=3, guidance_scale=3.0)
    a_alone = backend.render(batch_a)
    b_alone = backend.render(batch_b)

    paused, resume = threading.Event(), threading.Event()
    results: dict[str, Any] = {}

    def suspend_at_step_2(done: int, total: int) -> None:
        if done == 2:
            paused.set()
            if not resume.wait(WAIT_S):
                raise TimeoutError("never resumed")

    def run(key: str, batch: RenderBatch, hook: StepHook | None) -> Callable[[], None]:
        def target() -> None:
            try:
                results[key] = backend.render(batch, hook)
            except BaseException as exc:  # reported by the asserts below
                results[key] = exc

        return target

    thread_a = threading.Thread(target=run("a", batch_a, suspend_at_step_2), daemon=True)
    thread_a.start()
    assert paused.wait(WAIT_S), "A never reached step 2"
    thread_b = threading.Thread(target=run("b", batch_b, None), daemon=True)
    thread_b.start()
    thread_b.join(WAIT_S)
    assert "a" not in results  # A is still suspended while B ran to completion
    resume.set()
    thread_a.join(WAIT_S)

    assert isinstance(results["b"], list), results["b"]
    assert isinstance(results["a"], list), results["a"]
    assert all(np.array_equal(x, y) for x, y in zip(results["b"], b_alone, strict=True))
    assert all(np.array_equal(x, y) for x, y in zip(results["a"], a_alone, strict=True))


def test_a_batch_rendered_inside_another_batchs_hook_leaves_it_unchanged(backend: DiffusersBackend) -> None:
    # The renderer's device loop preempts on one thread: the urgent batch renders nested in the hook.
    batch_a = image_batch((1, 2), "a red fox in the snow", scheduler="dpm")
    batch_b = image_batch((7, 8, 9), "the blue sea at night", steps=3, guidance_scale=3.0, scheduler="dpm")
    a_alone = backend.render(batch_a)
    b_alone = backend.render(batch_b)
    nested: list[list[np.ndarray]] = []

    def preempt_at_step_2(done: int, total: int) -> None:
        if done == 2:
            nested.append(backend.render(batch_b))

    a_preempted = backend.render(batch_a, preempt_at_step_2)
    assert len(nested) == 1
    assert all(np.array_equal(x, y) for x, y in zip(nested[0], b_alone, strict=True))
    assert all(np.array_equal(x, y) for x, y in zip(a_preempted, a_alone, strict=True))


def test_named_schedulers(backend: DiffusersBackend) -> None:
    outputs = {}
    for name in ("ddim", "euler", "dpm", "pndm"):
        recorder = Recorder()
        (image,) = backend.render(image_batch((3,), scheduler=name), recorder)
        assert image.shape == (64, 64, 3)
        assert image.dtype == np.uint8
        # Also PNDM, whose loop has 5 iterations for 4 steps: progress counts requested steps.
        assert recorder.calls == [(i, 4) for i in range(1, 5)]
        outputs[name] = image
    (own,) = backend.render(image_batch((3,)))
    assert np.array_equal(own, outputs["ddim"])  # the tiny model's own scheduler is DDIM
    assert not np.array_equal(outputs["ddim"], outputs["euler"])
    assert not np.array_equal(outputs["ddim"], outputs["dpm"])
    assert not np.array_equal(outputs["euler"], outputs["dpm"])


def test_wrong_model_is_refused(backend: DiffusersBackend) -> None:
    batch = RenderBatch("sd15", 64, 64, 4, 7.5, None, (FrameSpec(1, 1, 0.0, "x"),))
    with pytest.raises(ValueError, match="sd15"):
        backend.render(batch)


def test_out_of_memory_becomes_render_oom(backend: DiffusersBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(*_args: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(backend, "_denoise", out_of_memory)
    with pytest.raises(RenderOOM, match="out of memory"):
        backend.render(image_batch((1, 2)))


def test_make_backend_builds_both_kinds(tiny_path: Path) -> None:
    assert isinstance(
        make_backend("diffusers", model_path=tiny_path, name=MODEL, device="cpu"), DiffusersBackend
    )
    synthetic = make_backend("synthetic", service_ms_per_frame=0, max_batch=3)
    assert isinstance(synthetic, SyntheticBackend)
    assert synthetic.max_batch() == 3
    with pytest.raises(ValueError, match="unknown backend"):
        make_backend("onnx")


def test_batches_are_validated() -> None:
    frame = FrameSpec(1, 1, 0.0, "x")
    with pytest.raises(ValueError, match="multiple of 8"):
        RenderBatch(MODEL, 60, 64, 4, 7.5, None, (frame,))
    with pytest.raises(ValueError, match="scheduler"):
        RenderBatch(MODEL, 64, 64, 4, 7.5, "lms", (frame,))
    with pytest.raises(ValueError, match="steps"):
        RenderBatch(MODEL, 64, 64, 0, 7.5, None, (frame,))
    with pytest.raises(ValueError, match="at least one frame"):
        RenderBatch(MODEL, 64, 64, 4, 7.5, None, ())
    with pytest.raises(ValueError, match="position"):
        FrameSpec(1, 2, 1.5, "x")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_render(tiny_path: Path) -> None:
    gpu = DiffusersBackend(tiny_path, MODEL)
    assert gpu.device.type == "cuda"
    assert gpu.dtype == torch.float16
    recorder = Recorder()
    first = gpu.render(image_batch((1, 2)), recorder)
    assert recorder.calls == [(i, 4) for i in range(1, 5)]
    assert [image.shape for image in first] == [(64, 64, 3), (64, 64, 3)]
    assert all(image.dtype == np.uint8 and image.std() > 1.0 for image in first)
    assert not np.array_equal(first[0], first[1])
    second = gpu.render(image_batch((1, 2)))
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


# --- the synthetic benchmarking backend -----------------------------------------------------------


def test_synthetic_frames_are_deterministic_and_sized() -> None:
    synthetic = SyntheticBackend(service_ms_per_frame=0)
    frames = (
        FrameSpec(1, 1, 0.0, "a cat"),
        FrameSpec(2, 2, 0.0, "a cat"),
        FrameSpec(1, 2, 0.5, "a cat"),
        FrameSpec(1, 2, 0.75, "a cat"),
        FrameSpec(1, 1, 0.0, "a dog"),
    )
    batch = RenderBatch("any", 80, 48, 4, 7.5, None, frames)
    out = synthetic.render(batch)
    assert [image.shape for image in out] == [(48, 80, 3)] * len(frames)
    assert all(image.dtype == np.uint8 for image in out)
    for i in range(len(out)):
        for j in range(i + 1, len(out)):
            assert not np.array_equal(out[i], out[j]), (i, j)
    again = synthetic.render(batch)
    assert all(np.array_equal(a, b) for a, b in zip(out, again, strict=True))


def test_synthetic_calls_on_step_and_honours_the_steps_override() -> None:
    recorder = Recorder()
    batch = RenderBatch("any", 16, 16, 6, 7.5, None, (FrameSpec(1, 1, 0.0, "x"),))
    SyntheticBackend(service_ms_per_frame=0).render(batch, recorder)
    assert recorder.calls == [(i, 6) for i in range(1, 7)]
    fixed = Recorder()
    SyntheticBackend(service_ms_per_frame=0, steps=3).render(batch, fixed)
    assert fixed.calls == [(1, 3), (2, 3), (3, 3)]


def test_synthetic_sleeps_the_emulated_gpu_time() -> None:
    synthetic = SyntheticBackend(service_ms_per_frame=40.0)
    frames = tuple(FrameSpec(i, i, 0.0, "x") for i in range(3))
    batch = RenderBatch("any", 16, 16, 4, 7.5, None, frames)
    assert synthetic.batch_cost_ms(3) == pytest.approx(120.0)
    started = time.perf_counter()
    synthetic.render(batch)
    assert time.perf_counter() - started >= 0.8 * 0.120
    efficient = SyntheticBackend(service_ms_per_frame=40.0, batch_efficiency=0.5)
    assert efficient.batch_cost_ms(3) == pytest.approx(80.0)
    assert efficient.batch_cost_ms(1) == pytest.approx(40.0)


def test_synthetic_at_zero_cost_never_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    import gpu_consumers.backends.synthetic as module

    sleeps: list[float] = []
    monkeypatch.setattr(module.time, "sleep", sleeps.append)
    batch = RenderBatch("any", 16, 16, 50, 7.5, None, (FrameSpec(1, 1, 0.0, "x"),) * 8)
    module.SyntheticBackend(service_ms_per_frame=0).render(batch)
    assert sleeps == []
    module.SyntheticBackend(service_ms_per_frame=10).render(batch)
    assert len(sleeps) == 50


def test_synthetic_hook_exceptions_propagate() -> None:
    def cancel(done: int, total: int) -> None:
        raise KeyboardInterrupt  # anything, unchanged

    batch = RenderBatch("any", 16, 16, 4, 7.5, None, (FrameSpec(1, 1, 0.0, "x"),))
    with pytest.raises(KeyboardInterrupt):
        SyntheticBackend(service_ms_per_frame=0).render(batch, cancel)


def test_synthetic_renderer_never_imports_torch_or_diffusers() -> None:
    code = (
        "import sys\n"
        "import gpu_consumers.backends as backends\n"
        "from gpu_consumers.backends.synthetic import SyntheticBackend\n"
        "b = backends.make_backend('synthetic', service_ms_per_frame=1.0)\n"
        "assert isinstance(b, SyntheticBackend)\n"
        "batch = backends.RenderBatch('m', 16, 16, 2, 7.5, None, (backends.FrameSpec(1, 2, 0.5, 'x'),))\n"
        "assert b.render(batch)[0].shape == (16, 16, 3)\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'PIL') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=WAIT_S, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
