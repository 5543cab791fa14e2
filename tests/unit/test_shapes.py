"""The shapes demo model's parts: scenes say what they draw, the checker tells right from wrong, the tokenizer
keeps words whole, the shipped weights load with plain diffusers, and a training run of a few steps writes a
folder that renders."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest

from gpu_consumers.shapes import scenes as sc
from gpu_consumers.shapes.checker import score
from gpu_consumers.shapes.training import SHIPPED, TrainConfig, train, write_tokenizer
from gpu_consumers.shapes.vocabulary import units

SCENES = 90  # a few seconds of drawing and checking


@pytest.fixture(scope="module")
def drawn() -> list[tuple[sc.Scene, np.ndarray]]:
    rng = random.Random(5)
    return [
        (s, sc.draw(s, rng=rng)) for s in (sc.random_scene(rng, kind) for kind in sc.KINDS * (SCENES // 3))
    ]


def test_captions_in_both_languages() -> None:
    scene = sc.Scene("single", "blue", (sc.Shape("yellow", "triangle", "big", "left"),))
    assert sc.caption(scene, "en") == "a big yellow triangle on the left on a blue background"
    assert sc.caption(scene, "zh") == "蓝色背景上左边的一个大黄色三角形"
    pair = sc.Scene(
        "pair",
        "white",
        (sc.Shape("red", "circle", "big", "left"), sc.Shape("blue", "square", "big", "right")),
        "left of",
    )
    assert sc.caption(pair, "en") == "a red circle to the left of a blue square on a white background"
    assert sc.caption(pair, "zh") == "白色背景上，一个红色圆形在一个蓝色正方形的左边"


def test_every_drawn_scene_is_what_its_caption_says(drawn: list[tuple[sc.Scene, np.ndarray]]) -> None:
    for scene, image in drawn:
        assert image.shape == (sc.IMAGE_SIZE, sc.IMAGE_SIZE, 3)
        result = score(image, scene)
        assert result.agreed, scene
        assert result.count_right and result.position_right and result.background_right, scene


def test_the_checker_rejects_a_wrong_colour_or_shape(drawn: list[tuple[sc.Scene, np.ndarray]]) -> None:
    for scene, image in drawn[:30]:
        first = scene.shapes[0]
        colour = next(c for c in sc.COLOURS if c not in {s.colour for s in scene.shapes} | {scene.background})
        shape = next(s for s in sc.SHAPES if s not in {s.shape for s in scene.shapes})
        for wrong in (dataclasses.replace(first, colour=colour), dataclasses.replace(first, shape=shape)):
            lie = dataclasses.replace(scene, shapes=(wrong, *scene.shapes[1:]))
            assert not score(image, lie).agreed, (scene, wrong)


def test_held_out_combinations_never_reach_training() -> None:
    rng = random.Random(0)
    training = sc.scenes(rng, 300, held_out=False)
    unseen = sc.scenes(rng, 100, held_out=True)
    assert not {s.combination() for s in training} & {s.combination() for s in unseen}
    share = sum(sc.random_scene(rng).held_out() for _ in range(2000)) / 2000
    assert 0.15 < share < 0.25


def test_the_tokenizer_keeps_each_word_and_character_whole(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    write_tokenizer(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    for unit, final in units(sc.all_captions()):
        if final and unit.isascii():
            assert len(tokenizer(unit, add_special_tokens=False).input_ids) == 1, unit
    chinese = "蓝色背景上的一个黄色三角形"
    assert len(tokenizer(chinese, add_special_tokens=False).input_ids) == len(chinese)
    # Text outside the vocabulary still tokenizes, into byte pieces, with no unknown token.
    ids = tokenizer("a lighthouse 🌊", add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids and len(ids) > 3


def test_shipped_weights_load_with_plain_diffusers() -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    assert json.loads((SHIPPED / "aigc_model.json").read_text())["name"] == "shapes-sd"
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size < 25 * 2**20
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED, local_files_only=True, torch_dtype=torch.float32)
    assert pipe.unet.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.images.shape == (1, 64, 64, 3)
    assert np.isfinite(out.images).all()


def test_real_size_configs_have_sd15_parameter_counts() -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench.realsize import text_config, unet_config, vae_config

    with torch.device("meta"):  # shapes only: no memory, no time
        unet = UNet2DConditionModel(**unet_config())
        vae = AutoencoderKL(**vae_config())
        text = CLIPTextModel(CLIPTextConfig(**text_config(49406, 49407, 49407)))
    count = {
        name: sum(p.numel() for p in m.parameters())
        for name, m in (("unet", unet), ("vae", vae), ("text", text))
    }
    assert count == {"unet": 859_520_964, "vae": 83_653_863, "text": 123_060_480}


def test_a_few_training_steps_write_a_pipeline_folder(tmp_path: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    config = TrainConfig(images=12, vae_steps=2, vae_batch=4, unet_steps=3, unet_batch=4)
    folder = train(tmp_path / "model", config, say=lambda _: None)
    marker = json.loads((folder / "aigc_model.json").read_text())
    assert marker["steps_taken"]["vae"] == 2 and marker["steps_taken"]["unet"] == 3
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.unet.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


def test_the_report_counts_colours_and_shapes_apart(drawn: list[tuple[sc.Scene, np.ndarray]]) -> None:
    from gpu_consumers.shapes.evaluation import _report

    scene, image = drawn[0]  # one shape: a wrong colour leaves the shape right, and the other way round
    assert scene.kind == "single"
    first = scene.shapes[0]
    colour = next(c for c in sc.COLOURS if c not in {s.colour for s in scene.shapes} | {scene.background})
    shape = next(s for s in sc.SHAPES if s not in {s.shape for s in scene.shapes})
    wrong_colour = dataclasses.replace(scene, shapes=(dataclasses.replace(first, colour=colour),))
    wrong_shape = dataclasses.replace(scene, shapes=(dataclasses.replace(first, shape=shape),))
    prompts = [(s, "en", sc.caption(s)) for s in (scene, wrong_colour, wrong_shape)]
    report = _report(prompts, [score(image, s) for s, _, _ in prompts], 1.0)
    assert (report.agreement, report.colours, report.shapes) == pytest.approx((1 / 3, 2 / 3, 2 / 3))
    assert "colours right: 66.7%, shapes right: 66.7%" in "\n".join(report.lines())
