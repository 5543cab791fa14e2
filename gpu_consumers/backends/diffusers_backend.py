"""The product backend: renders a `RenderBatch` with a diffusers Stable Diffusion pipeline.

The pipeline is loaded once. Each `render` call encodes the prompts with the pipeline's own tokenizer and
text encoder, interpolates ``prompt`` -> ``prompt_end`` embeddings and seed noises per frame by position
(`gpu_consumers.latents`), and runs the diffusers denoising loop with those embeddings and latents, calling
the step hook after every denoising step.

Preemption: the renderer may call `render` for batch B on a second thread while batch A's call is blocked
in its step hook. Schedulers are stateful (timesteps, step index, multistep history) and the pipeline object
keeps per-call state (guidance scale, timestep count), so every call runs on its OWN pipeline object with
its own fresh scheduler; only the weights (UNet, VAE, text encoder, tokenizer) are shared, and inference
does not mutate them. Building that object costs about 2 ms and copies no weights.

Consumes: a model folder (the tiny model or a real SD 1.x/2.x folder) and `RenderBatch` values.
Produces: HxWx3 uint8 RGB arrays; raises `RenderOOM` when the GPU runs out of memory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)

from gpu_consumers.backends.base import RenderBatch, RenderOOM, StepHook
from gpu_consumers.latents import frame_latents, lerp_embeddings
from gpu_consumers.models import load_pipeline

# name -> (scheduler class, config overrides). PNDM's Runge-Kutta warm-up multiplies the model calls (13
# for 4 steps); SD checkpoints skip it, and so do we when PNDM is asked for by name.
_SCHEDULERS: dict[str, tuple[Any, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "dpm": (DPMSolverMultistepScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
}


class DiffusersBackend:
    """Stable Diffusion through diffusers; fp16 with VAE slicing on CUDA, fp32 on the CPU."""

    def __init__(self, model_path: Path, name: str, device: str | None = None, max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.name = name
        self._max_batch = max_batch
        self._pipe = load_pipeline(Path(model_path), device)
        self.device: torch.device = self._pipe.device
        self.dtype: torch.dtype = self._pipe.unet.dtype

    def max_batch(self) -> int:
        """The most frames rendered in one pipeline call (``max_batch`` of the model's registry entry)."""
        return self._max_batch

    def _pipeline_for(self, scheduler: str | None) -> Any:
        """A pipeline object for one call: the shared modules and a fresh scheduler of its own."""
        base = self._pipe.scheduler
        if scheduler is None:
            fresh = type(base).from_config(base.config)
        else:
            cls, overrides = _SCHEDULERS[scheduler]
            fresh = cls.from_config(base.config, **overrides)
        # requires_safety_checker only controls a warning; a folder's safety checker, if any, still runs.
        pipe: Any = StableDiffusionPipeline(
            **{**self._pipe.components, "scheduler": fresh}, requires_safety_checker=False
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _encoder(self, pipe: Any) -> Callable[[str], torch.Tensor]:
        """Text -> (1, tokens, dim) embeddings, as diffusers' encode_prompt computes them; cached per call.

        Each distinct string is encoded on its own, so a frame's embedding never depends on which other
        prompts share its batch.
        """
        cache: dict[str, torch.Tensor] = {}
        tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
        use_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))

        def encode(text: str) -> torch.Tensor:
            if text not in cache:
                tokens = tokenizer(
                    text,
                    padding="max_length",
                    max_length=tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                )
                mask = tokens.attention_mask.to(self.device) if use_mask else None
                cache[text] = text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
            return cache[text]

        return encode

    def render(self, batch: RenderBatch, on_step: StepHook | None = None) -> list[np.ndarray]:
        """One HxWx3 uint8 RGB array per frame of ``batch``; `RenderOOM` when CUDA runs out of memory."""
        if batch.model != self.name:
            raise ValueError(f"batch is for model {batch.model!r}, this backend serves {self.name!r}")
        pipe = self._pipeline_for(batch.scheduler)
        oom: str | None = None
        try:
            with torch.inference_mode():
                images = self._denoise(pipe, batch, on_step)
        except torch.cuda.OutOfMemoryError as exc:
            oom = str(exc)
        if oom is not None:
            # Outside the except block, so the exception's traceback (and the tensors its frames hold)
            # is gone and empty_cache can actually hand the memory back.
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise RenderOOM(oom)
        pixels = np.rint(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
        return list(pixels)

    def _denoise(self, pipe: Any, batch: RenderBatch, on_step: StepHook | None) -> np.ndarray:
        """The images of ``batch`` as an (n, H, W, 3) float array in [0, 1]."""
        encode = self._encoder(pipe)
        prompt_embeds = torch.cat(
            [
                lerp_embeddings(
                    encode(f.prompt),
                    encode(f.prompt if f.prompt_end is None else f.prompt_end),
                    f.position,
                )
                for f in batch.frames
            ]
        )
        # Without classifier-free guidance diffusers never reads negative embeddings; skip encoding them.
        guided = batch.guidance_scale > 1.0 and pipe.unet.config.time_cond_proj_dim is None
        negative_embeds = (
            torch.cat([encode(f.negative_prompt or "") for f in batch.frames]) if guided else None
        )
        shape = (
            pipe.unet.config.in_channels,
            batch.height // pipe.vae_scale_factor,
            batch.width // pipe.vae_scale_factor,
        )
        # Drawn on the CPU in float32 for every device, then moved: a seed means the same picture anywhere.
        # (prepare_latents only moves latents we pass, so the dtype must be right here.)
        latents = torch.stack(
            [frame_latents(f.seed_start, f.seed_end, f.position, shape) for f in batch.frames]
        ).to(device=self.device, dtype=self.dtype)

        reported = 0

        def step_end(p: Any, step_index: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            nonlocal reported
            # Progress is counted in requested steps, so `total` is always batch.steps and the last call
            # has done == total. A scheduler may loop more often than that (PNDM repeats its first model
            # call: 5 iterations for 4 steps); such an extra iteration reports nothing.
            done = (step_index + 1) * batch.steps // p.num_timesteps
            if on_step is not None and done > reported:
                reported = done
                on_step(done, batch.steps)
            return kwargs

        output = pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            latents=latents,
            height=batch.height,
            width=batch.width,
            num_inference_steps=batch.steps,
            guidance_scale=batch.guidance_scale,
            output_type="np",
            callback_on_step_end=step_end if on_step is not None else None,
        )
        return np.asarray(output.images)
