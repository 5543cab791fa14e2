"""Model folders: build the project's own tiny random-weight Stable Diffusion, and load any SD folder.

`build_tiny` writes a complete ``diffusers.StableDiffusionPipeline`` folder (UNet, VAE, CLIP text encoder,
a CLIP byte-level BPE tokenizer whose vocabulary the project writes itself, DDIM scheduler) with random
weights, so the whole pipeline can be developed and tested offline, in seconds, on a CPU. It has the shape
of SD 1.x (4 latent channels, VAE scale factor 8, 77-token CLIP prompts, cross-attention UNet), only tiny:
a 64x64 image has 8x8 latents. The images are noise-like, but deterministic for a seed.

`load_pipeline` loads such a folder, or a real SD 1.x/2.x checkpoint folder, from local files only.

Consumes: a target folder and a weight seed. Produces: the folder (``model_index.json``, component
subfolders, and an ``aigc_model.json`` marker), or a loaded pipeline.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

MARKER = "aigc_model.json"
TINY_NAME = "tiny-sd"
MAX_PROMPT_TOKENS = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
# A few English merges so the BPE path is exercised; every other string falls back to byte tokens.
_MERGES = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("i", "n"),
    ("e", "r"),
    ("o", "n"),
    ("a", "t"),
    ("e", "n"),
)


# Stable Diffusion 1.x's noise schedule, as its DDIM scheduler config says it: the tiny model, the shapes
# model and the real-size benchmark use it.
SD_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from the 256 byte values to printable unicode characters.

    The same table the byte-level pre-tokenizer uses, so every UTF-8 byte has a vocabulary entry and any
    text (Chinese, emoji) tokenizes without unknown tokens.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    byte_values = list(printable)
    code_points = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(c) for c in code_points), strict=True))


def tokenizer_files() -> tuple[dict[str, int], str]:
    """The tiny tokenizer's ``vocab.json`` mapping and ``merges.txt`` text, laid out like CLIP's.

    Bytes, then bytes with the end-of-word suffix, then merge results, then the two special tokens last
    (as in CLIP, where ``<|endoftext|>`` has the largest id).
    """
    chars = list(_bytes_to_unicode().values())
    tokens = [*chars, *(c + END_OF_WORD for c in chars), *(a + b for a, b in _MERGES), BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES)
    return vocab, merges


def _write_tokenizer_files(folder: Path) -> None:
    vocab, merges = tokenizer_files()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(merges, encoding="utf-8")


def _tiny_pipeline(work: Path, seed: int) -> Any:
    """The tiny pipeline in memory; ``work`` is scratch space for the tokenizer files."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer_dir = work / "tokenizer-source"
    _write_tokenizer_files(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=MAX_PROMPT_TOKENS)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,  # latents; x8 = 64 px, the default image size of this model
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    # Four blocks make the VAE scale factor 8 like SD's, so latents are small and CPU renders fast.
    vae = AutoencoderKL(
        block_out_channels=[8, 16, 32, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )
    torch.manual_seed(seed)
    # The CLIP text model pools at the first eos_token_id (or, for the legacy eos_token_id=2, at the
    # largest input id); the ids here are the tokenizer's real ones so the first branch applies.
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=len(tokenizer),
            max_position_embeddings=MAX_PROMPT_TOKENS,
        )
    )
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _is_tiny(path: Path, seed: int) -> bool:
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("name") == TINY_NAME and marker.get("seed") == seed


def build_tiny(path: Path, seed: int = 0) -> Path:
    """Write the tiny random-weight SD pipeline (weights from ``seed``) to ``path``; return ``path``.

    The folder is built beside ``path`` and renamed into place in one step, so a crash never leaves a
    half-written model, and concurrent builders are safe: the first rename wins and the others discard
    their copy. If ``path`` already holds the tiny model of this seed it is left as it is; any other
    existing ``path`` raises ``FileExistsError`` rather than being overwritten.
    """
    path = Path(path)
    if _is_tiny(path, seed):
        return path
    if path.exists():
        raise FileExistsError(f"{path} exists and is not the tiny model of seed {seed}")
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
    try:
        staged = scratch / "model"
        pipe = _tiny_pipeline(scratch, seed)
        pipe.save_pretrained(staged)
        # Slow (pure Python) CLIP tokenizers of older transformers read these two files, the fast one
        # reads tokenizer.json; keeping both makes the folder load everywhere.
        _write_tokenizer_files(staged / "tokenizer")
        marker = {"name": TINY_NAME, "kind": "tiny-random", "seed": seed}
        (staged / MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        try:
            staged.rename(path)
        except OSError:
            # Someone else finished first; their folder is the same model if the marker says so.
            if not _is_tiny(path, seed):
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def load_pipeline(path: Path, device: str | None = None) -> Any:
    """Load an SD pipeline folder from local files only, ready for inference on ``device``.

    ``device`` defaults to ``"cuda"`` when available, else ``"cpu"``. On CUDA the weights are float16 and
    the VAE decodes a batch one image at a time (slicing), which caps the decode's memory peak; on the
    CPU they stay float32 (half precision is slow or unsupported there). The progress bar is off.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = torch.device(device).type == "cuda"
    dtype = torch.float16 if on_cuda else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(Path(path), local_files_only=True, torch_dtype=dtype)
    pipe = pipe.to(device)
    if on_cuda:
        pipe.vae.enable_slicing()
        # NHWC convolutions are the fast layout for fp16 tensor cores.
        pipe.unet.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    return pipe
