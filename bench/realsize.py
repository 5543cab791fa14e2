"""SD15: a random-weight model with Stable Diffusion 1.5's real architecture, timed on this machine.

Nothing is downloaded: the UNet (860M parameters), VAE (84M) and CLIP ViT-L/14 text encoder (123M) are built
from their published configurations, written here, with random weights; a picture of noise costs what a real
one costs. The scenario measures:

- **the model alone** (always): seconds per 512x512 image at a few DDIM steps with classifier-free guidance,
  at batch 1 and batch 2 (and 4, 8 on CUDA), the batching gain, and the memory peak (the process's peak RSS
  on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA). On CUDA the weights are float16 and the UNet
  channels-last, as `gpu_consumers.models.load_pipeline` loads them; ``--compile`` adds ``torch.compile``.
- **the pipeline around it** (CUDA only: on a CPU a 512x512 backlog would take hours): the folder is saved
  (float16), one renderer serves it under a standing backlog of image requests, and the report gives the
  renderer's busy fraction (`bench.scenarios._busy`) and the pipeline's overhead (end to end minus render
  time, per request) as a share of render time.

Run alone (no infrastructure needed on a CPU): ``nice -n 19 .venv/bin/python -m bench.realsize``; as part of
the suite: ``aigc bench --only SD15``.

Consumes: nothing but the device. Produces: a dict of figures (printed as JSON when run alone).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "a photograph of an astronaut riding a horse"


def unet_config() -> dict[str, Any]:
    """runwayml/stable-diffusion-v1-5 ``unet/config.json``."""
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "down_block_types": (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "mid_block_scale_factor": 1,
    }


def vae_config() -> dict[str, Any]:
    """The SD 1.x VAE (``vae/config.json``): scale factor 8, 4 latent channels."""
    return {
        "sample_size": 512,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "scaling_factor": 0.18215,
    }


def text_config(bos: int, eos: int, pad: int) -> dict[str, Any]:
    """CLIP ViT-L/14's text tower, as SD 1.x uses it (``text_encoder/config.json``)."""
    return {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
        "layer_norm_eps": 1e-5,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }


def build(seed: int = 0) -> Any:
    """The random-weight SD 1.5-sized StableDiffusionPipeline, in float32 on the CPU."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from gpu_consumers.models import MAX_PROMPT_TOKENS, SD_SCHEDULER, _write_tokenizer_files

    with tempfile.TemporaryDirectory() as work:
        _write_tokenizer_files(Path(work))
        tokenizer = CLIPTokenizer.from_pretrained(work, model_max_length=MAX_PROMPT_TOKENS)
    torch.manual_seed(seed)
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel(**unet_config()),
        vae=AutoencoderKL(**vae_config()),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_config(*ids))),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_model(
    steps: int, batches: tuple[int, ...], compile_unet: bool = False, repeats: int = 1
) -> dict[str, Any]:
    """Seconds per image at each batch size, with the product's device settings; see the module docstring."""
    import torch

    cuda = torch.cuda.is_available()
    began = time.monotonic()
    pipe = build()
    params = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6
              for name in ("unet", "vae", "text_encoder")}  # fmt: skip
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": "float16" if cuda else "float32",
        "params_m": {k: round(v, 1) for k, v in params.items()},
        "size": "512x512",
        "steps": steps,
        "guidance_scale": 7.5,
        "build_s": round(time.monotonic() - began, 1),
    }
    if cuda:
        pipe = pipe.to("cuda", torch.float16)
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.enable_slicing()
        if compile_unet:
            pipe.unet = torch.compile(pipe.unet)
            out["compiled"] = True
    pipe.set_progress_bar_config(disable=True)
    out["rss_after_build_mb"] = round(_peak_rss_mb())

    def render(batch: int) -> float:
        generator = torch.Generator("cpu").manual_seed(0)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            pipe([PROMPT] * batch, height=512, width=512, num_inference_steps=steps, guidance_scale=7.5,
                 generator=generator, output_type="np")  # fmt: skip
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    render(1)  # warm-up: allocator, kernels (and compilation)
    per_image: dict[str, float] = {}
    for batch in batches:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = min(render(batch) for _ in range(repeats))
        per_image[f"batch_{batch}"] = round(seconds / batch, 3)
        if cuda:
            out[f"cuda_peak_mb_batch_{batch}"] = round(torch.cuda.max_memory_allocated() / 2**20)
        print(f"SD15 batch {batch}: {seconds:.2f} s, {seconds / batch:.2f} s per image", flush=True)
    out["s_per_image"] = per_image
    first, last = batches[0], batches[-1]
    out[f"batching_gain_{last}_vs_{first}"] = round(
        per_image[f"batch_{first}"] / per_image[f"batch_{last}"], 3
    )
    out["peak_rss_mb"] = round(_peak_rss_mb())
    return out


def time_components(batches: tuple[int, ...], steps: tuple[int, ...] = (4, 25)) -> dict[str, Any]:
    """Per-call wall and CPU seconds of each component at each batch, and the per-image times they add up to.

    A 512x512 picture with classifier-free guidance is one text-encoder call on 2b prompts, ``steps`` UNet
    calls on 2b latents and one VAE decode of b latents (b = batch; the scheduler's arithmetic is noise).
    Timing each call once, instead of whole renders, makes the figure affordable on a CPU: a whole 25-step
    render would take minutes. CPU seconds (``time.process_time``: every thread of the process) are the
    figure to trust on a shared machine, where wall time also counts the other processes' turns.
    """
    import torch

    began = time.monotonic()
    pipe = build()
    out: dict[str, Any] = {
        "device": f"cpu ({torch.get_num_threads()} threads)",
        "dtype": "float32",
        "params_m": {
            name: round(sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6, 1)
            for name in ("unet", "vae", "text_encoder")
        },
        "size": "512x512",
        "build_s": round(time.monotonic() - began, 1),
        "rss_after_build_mb": round(_peak_rss_mb()),
    }
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids

    def timed(call: Any) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        call()
        return time.perf_counter() - wall, time.process_time() - cpu

    calls: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        context = pipe.text_encoder(ids)[0]
        pipe.unet(torch.randn(2, 4, 64, 64), 500, context.repeat(2, 1, 1))  # warm-up
        for b in batches:
            latents = torch.randn(2 * b, 4, 64, 64)
            te = timed(lambda b=b: pipe.text_encoder(ids.repeat(2 * b, 1)))
            unet = timed(lambda b=b, x=latents: pipe.unet(x, 500, context.repeat(2 * b, 1, 1)))
            vae = timed(lambda b=b, x=latents: pipe.vae.decode(x[:b] / pipe.vae.config.scaling_factor))
            calls[f"batch_{b}"] = {
                "text_encoder_s": round(te[0], 2), "unet_call_s": round(unet[0], 2),
                "vae_decode_s": round(vae[0], 2),
                "text_encoder_cpu_s": round(te[1], 2), "unet_call_cpu_s": round(unet[1], 2),
                "vae_decode_cpu_s": round(vae[1], 2),
            }  # fmt: skip
            print(f"SD15 batch {b}: {calls[f'batch_{b}']}", flush=True)
    out["per_call"] = calls
    for kind in ("s", "cpu_s"):
        for n in steps:
            out[f"{kind}_per_image_{n}_steps"] = {
                key: round(
                    (c[f"text_encoder_{kind}"] + n * c[f"unet_call_{kind}"] + c[f"vae_decode_{kind}"])
                    / int(key.removeprefix("batch_")),
                    2,
                )
                for key, c in calls.items()
            }
    first, last = f"batch_{batches[0]}", f"batch_{batches[-1]}"
    for n in steps:
        per = out[f"cpu_s_per_image_{n}_steps"]
        out[f"batching_gain_{n}_steps_cpu"] = round(per[first] / per[last], 3)
    out["peak_rss_mb"] = round(_peak_rss_mb())
    return out


def pipeline_under_backlog(settings: Any, folder: Path, count: int, steps: int) -> dict[str, Any]:
    """One renderer serving the real-size model under a standing backlog: busy fraction and overhead share."""
    import dataclasses
    import statistics

    from bench.harness import Collector, Load, image
    from bench.scenarios import _busy, _finished, _run, configure

    conf = configure(settings, synthetic=False, max_batch=8, tiny_model=folder)
    with _run(conf, 1, None, "sd15") as pipeline:
        collector = Collector(pipeline.settings).start()
        load = Load(pipeline.settings, collector)
        try:
            fields = dataclasses.replace(image("tiny-sd", steps=steps), width=512, height=512)
            load.backlog(4, fields)  # warm-up
            collector.wait(4, 600)
            before = set(collector.requests)
            load.backlog(count, fields)
            collector.wait(4 + count, 1800)
            timings = _finished([collector.requests[r] for r in set(collector.requests) - before])
        finally:
            load.close()
            collector.close()
    fractions = _busy(timings)
    overhead = [(t.e2e_ms - t.render_ms) / t.render_ms for t in timings if t.e2e_ms and t.render_ms]
    return {
        "backlog": count,
        "steps": steps,
        "busy_fraction": statistics.fmean(fractions.values()),
        "mean_batch": statistics.fmean(task.batch_size for t in timings for task in t.tasks),
        "overhead_share_of_render_p50": statistics.median(overhead) if overhead else None,
    }


def sd15(settings: Any, quick: bool) -> dict[str, Any]:
    """Stable Diffusion 1.5-sized random-weight model: s per 512x512 image, batching gain, memory; GPU:
    busy."""
    import torch

    cuda = torch.cuda.is_available()
    out: dict[str, Any] = {"model": time_model(20, (1, 2, 4, 8)) if cuda else time_components((1, 2))}
    if cuda:
        with tempfile.TemporaryDirectory() as work:
            folder = Path(work) / "sd15-random"
            build().to(torch.float16).save_pretrained(folder)
            out["pipeline"] = pipeline_under_backlog(settings, folder, 40 if quick else 160, 20)
    else:
        out["pipeline"] = "not run: no CUDA device (a 512x512 backlog on this CPU would take hours)"
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.realsize`: time the SD 1.5-sized model and print (or write) its figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.realsize", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps per image (default: %(default)s)")
    parser.add_argument(
        "--batches", default="1,2", help="batch sizes, comma-separated (default: %(default)s)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA)")
    parser.add_argument(
        "--whole", action="store_true", help="time whole renders, not component calls (the default on CUDA)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    batches = tuple(int(b) for b in args.batches.split(","))
    whole = args.whole or torch.cuda.is_available()
    figures = time_model(args.steps, batches, args.compile) if whole else time_components(batches)
    json.dump(figures, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
