"""Train the demo's text-to-image model on procedural scenes and save it as a StableDiffusionPipeline folder.

Three components are trained from random weights, on the CPU, with fixed seeds and step counts (so the same
command on the same torch build gives the same weights):

1. an `AutoencoderKL` with VAE scale factor 4 (64x64 RGB <-> 16x16x4 latents), on reconstruction with a small
   KL term; its ``scaling_factor`` is then set so the training latents have unit standard deviation, as SD's;
2. a `CLIPTextModel` (word-level tokenizer from `vocabulary`: one token per English word or Chinese
   character) and a `UNet2DConditionModel` that cross-attends to it, trained together on the usual epsilon
   objective; one caption in ten is replaced by "" so classifier-free guidance works, and an exponential
   moving average of the UNet's weights is what is saved.

The folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` and
an
``aigc_model.json`` marker) loads with plain ``StableDiffusionPipeline.from_pretrained``; weights are stored
in
float16 to keep the shipped folder small and are loaded in the loader's dtype. Training never sees a scene
whose attribute combination is held out (`Scene.held_out`).

Consumes: a target folder and a `TrainConfig`. Produces: the folder; progress lines on stdout.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpu_consumers.models import MARKER, SD_SCHEDULER
from gpu_consumers.shapes import scenes as sc
from gpu_consumers.shapes.vocabulary import tokenizer_files

NAME = "shapes-sd"
SHIPPED = Path(__file__).parent / "model"  # the trained weights, kept in the repository
MAX_TOKENS = 32
CAPTION_DROPOUT = 0.1


@dataclass(frozen=True)
class TrainConfig:
    """What a training run does: seeds, data size, steps, batch sizes and learning rate, a time limit."""

    seed: int = 0
    images: int = 10_000  # training scenes drawn (each with its own jitter)
    vae_steps: int = 1_500
    vae_batch: int = 32
    unet_steps: int = 2_400
    unet_batch: int = 32
    lr: float = 1e-3
    ema_decay: float = 0.999
    # Optional wall-time limit: the VAE may take VAE_SHARE of it; each phase's schedule then runs by time or
    # by steps, whichever is further along, so a slow or shared machine ends on time with decayed weights.
    max_minutes: float | None = None
    threads: int = 2


def build_components(tokenizer_dir: Path) -> dict[str, Any]:
    """Randomly initialised components of the shapes model (the architecture, not the weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=MAX_TOKENS)
    vae = AutoencoderKL(
        block_out_channels=[16, 32, 64],  # three blocks: scale factor 4, 64 px <-> 16x16 latents
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=4,
        norm_num_groups=16,
        layers_per_block=1,
        sample_size=sc.IMAGE_SIZE,
        mid_block_add_attention=False,  # purely convolutional: it trains on crops, runs on whole pictures
    )
    unet = UNet2DConditionModel(
        sample_size=sc.IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        # No attention at 16x16 (the costly resolution); cross-attention to the caption at 8x8 and 4x4.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_attention_heads=4,
            num_hidden_layers=3,
            max_position_embeddings=MAX_TOKENS,
            layer_norm_eps=1e-5,
        )
    )
    return {"tokenizer": tokenizer, "vae": vae, "unet": unet, "text_encoder": text_encoder}


def write_tokenizer(folder: Path) -> None:
    """The word-level tokenizer's vocab.json and merges.txt for every caption word, into ``folder``."""
    vocab, merges = tokenizer_files(sc.all_captions())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(merges, encoding="utf-8")


VAE_SHARE = 0.35  # of a time limit, the share the VAE phase may take
VAE_CROP = 32  # the VAE trains on crops of this side


def _cosine(progress: float, warmup: float) -> float:
    """Learning-rate factor at ``progress`` in [0, 1] of a phase: linear warm-up, then cosine to 10%."""
    if progress < warmup:
        return max(progress / warmup, 0.01)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min((progress - warmup) / (1 - warmup), 1.0)))


class _Clock:
    def __init__(self, max_minutes: float | None, say: Callable[[str], None]) -> None:
        self.start = time.monotonic()
        self.limit = math.inf if max_minutes is None else max_minutes * 60
        self.say = say

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def phase(self, steps: int, share: float) -> _Phase:
        """A phase of ``steps`` that may take ``share`` of the time left under the limit."""
        now = time.monotonic()
        return _Phase(steps, now, now + share * (self.start + self.limit - now))


@dataclass
class _Phase:
    """How far a phase is: by steps, or by time when a limit is set and time runs out first.

    Without a limit the schedule depends on the step alone (the same weights every run); with one, a slow
    machine still gets a full warm-up and decay, over fewer steps.
    """

    steps: int
    start: float
    deadline: float

    def progress(self, step: int) -> float:
        by_time = (
            (time.monotonic() - self.start) / (self.deadline - self.start) if self.deadline < math.inf else 0
        )
        return max(step / self.steps, by_time)

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0


def _draw_pool(config: TrainConfig) -> tuple[list[sc.Scene], np.ndarray]:
    rng = random.Random(config.seed)
    pool = sc.scenes(rng, config.images, held_out=False)
    images = np.stack([sc.draw(s, rng=rng) for s in pool])
    return pool, images


def _to_tensor(images: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(vae: Any, images: np.ndarray, config: TrainConfig, clock: _Clock) -> int:
    """Train the autoencoder; returns the steps taken."""
    import torch

    generator = torch.Generator().manual_seed(config.seed)
    optimiser = torch.optim.AdamW(vae.parameters(), lr=3e-3, weight_decay=0.0)
    phase = clock.phase(config.vae_steps, VAE_SHARE)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: _cosine(phase.progress(s), 0.04))
    vae.train()
    step = 0
    while not phase.done(step):
        index = torch.randint(0, len(images), (config.vae_batch,), generator=generator)
        # A random 32x32 crop (on the 4 px latent grid) of each picture: a quarter of the cost per sample, and
        # a convolutional autoencoder without attention works the same on the whole picture.
        y, x0 = (
            int(v) * 4
            for v in torch.randint(0, (sc.IMAGE_SIZE - VAE_CROP) // 4 + 1, (2,), generator=generator)
        )
        x = _to_tensor(images[index.numpy(), y : y + VAE_CROP, x0 : x0 + VAE_CROP])
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = (reconstruction - x).abs().mean() + ((reconstruction - x) ** 2).mean()
        loss = loss + 1e-6 * posterior.kl().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        step += 1
        if step % 50 == 0 or phase.done(step):
            clock.say(f"vae {step}/{config.vae_steps} loss {loss.item():.4f} ({clock.elapsed():.0f} s)")
    if step < config.vae_steps:
        clock.say(f"vae: {step} steps, the time limit's share ran out first")
    vae.eval()
    return step


def encode_latents(vae: Any, images: np.ndarray) -> Any:
    """Posterior means of every image (unscaled)."""
    import torch

    with torch.inference_mode():
        parts = [
            vae.encode(_to_tensor(images[i : i + 256])).latent_dist.mean for i in range(0, len(images), 256)
        ]
    return torch.cat(parts)


def _reconstruction_agreement(vae: Any, pool: list[sc.Scene], latents: Any, n: int = 200) -> float:
    """Share of decoded training latents the checker agrees with: the ceiling the VAE sets on agreement."""
    import torch

    from gpu_consumers.shapes.checker import score

    with torch.inference_mode():
        decoded = vae.decode(latents[:n]).sample
    pixels = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return sum(score(p, s).agreed for p, s in zip(pixels, pool[:n], strict=False)) / n


def train_denoiser(parts: dict[str, Any], pool: list[sc.Scene], latents: Any, config: TrainConfig,
                   clock: _Clock) -> tuple[Any, int]:  # fmt: skip
    """Train the UNet and text encoder together; returns the UNet's moving average and the steps taken."""
    import torch
    from diffusers import DDPMScheduler

    unet, text_encoder, tokenizer = parts["unet"], parts["text_encoder"], parts["tokenizer"]
    noise_scheduler = DDPMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k != "set_alpha_to_one"})
    alphas = noise_scheduler.alphas_cumprod  # type: ignore[attr-defined]
    rng = random.Random(config.seed + 1)
    generator = torch.Generator().manual_seed(config.seed + 1)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-2)
    phase = clock.phase(config.unet_steps, 1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: _cosine(phase.progress(s), 0.04))
    ema = copy.deepcopy(unet).requires_grad_(False)
    unet.train()
    text_encoder.train()
    step = 0
    while not phase.done(step):
        index = torch.randint(0, len(pool), (config.unet_batch,), generator=generator)
        captions = [
            "" if rng.random() < CAPTION_DROPOUT else sc.caption(pool[i], rng.choice(("en", "zh")), rng)
            for i in index.tolist()
        ]
        ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids  # fmt: skip
        context = text_encoder(ids)[0]
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (config.unet_batch,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(unet(noisy, t, context).sample, noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        step += 1
        decay = min(config.ema_decay, step / (9 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        if step % 100 == 0 or phase.done(step):
            clock.say(f"unet {step}/{config.unet_steps} loss {loss.item():.4f} ({clock.elapsed():.0f} s)")
    if step < config.unet_steps:
        clock.say(f"unet: {step} steps, the time limit ran out first")
    text_encoder.eval()
    return ema.eval(), step


def train(path: Path, config: TrainConfig | None = None, say: Callable[[str], None] = print) -> Path:
    """Train the shapes model into ``path`` (built beside it, renamed into place); return ``path``."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    config = config or TrainConfig()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    path = Path(path)
    clock = _Clock(config.max_minutes, say)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.training-", dir=path.parent))
    try:
        write_tokenizer(scratch / "tokenizer-source")
        parts = build_components(scratch / "tokenizer-source")
        say(f"drawing {config.images} training scenes")
        pool, images = _draw_pool(config)
        vae_steps = train_vae(parts["vae"], images, config, clock)
        latents = encode_latents(parts["vae"], images)
        ceiling = _reconstruction_agreement(parts["vae"], pool, latents)
        say(f"vae reconstructions the checker agrees with: {100 * ceiling:.1f}%")
        scale = float(1.0 / latents.std())
        parts["vae"].register_to_config(scaling_factor=scale)
        latents = latents * scale
        say(f"latents: scaling factor {scale:.4f} ({clock.elapsed():.0f} s)")
        unet, unet_steps = train_denoiser(parts, pool, latents, config, clock)
        pipe = StableDiffusionPipeline(
            vae=parts["vae"].half(),
            text_encoder=parts["text_encoder"].half(),
            tokenizer=parts["tokenizer"],
            unet=unet.half(),
            scheduler=DDIMScheduler(**SD_SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        staged = scratch / "model"
        pipe.save_pretrained(staged)  # type: ignore[attr-defined]
        write_tokenizer(staged / "tokenizer")
        marker = {"name": NAME, "kind": "trained", "config": asdict(config), "steps_taken":
                  {"vae": vae_steps, "unet": unet_steps, "vae_reconstruction_agreement": round(ceiling, 3)},
                  "train_seconds": round(clock.elapsed())}  # fmt: skip
        (staged / MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        if path.exists():
            shutil.rmtree(path)
        staged.rename(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    say(f"saved {path} after {clock.elapsed():.0f} s")
    return path


def install(path: Path, say: Callable[[str], None] = print) -> Path:
    """Make ``path`` hold the shapes model: a copy of the shipped folder, trained into place first if
    missing."""
    path = Path(path)
    if (path / "model_index.json").exists():
        return path
    if not (SHIPPED / "model_index.json").exists():
        say(f"no shipped weights in {SHIPPED}: training them (about 30 minutes on a CPU)")
        train(SHIPPED, say=say)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{path.name}.copying-", dir=path.parent))
    try:
        shutil.copytree(SHIPPED, staged / "model")
        try:
            (staged / "model").rename(path)
        except OSError:
            if not (path / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return path
