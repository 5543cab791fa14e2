"""Prompt agreement: render captions of scenes the model never saw and score the pictures with the checker.

The prompts are full captions (every attribute said) of scenes whose attribute combination is held out of
training (`Scene.held_out`), half in English and half in Chinese, rendered through the renderer's own
`DiffusersBackend` (the code path a request takes) with one seed per prompt. Agreement is the share of
pictures
in which the checker finds exactly the named kinds of shape in the named colours; position, count and
background are reported beside it, as are the figures per scene kind and per language.

Consumes: a model folder. Produces: a `Report` (and, optionally, a contact sheet of the pictures).
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpu_consumers.shapes import scenes as sc
from gpu_consumers.shapes.checker import Score, score

STEPS = 25
GUIDANCE = 7.5
BATCH = 25


@dataclass
class Report:
    """Agreement over the unseen prompts, overall and per scene kind and language."""

    prompts: int
    agreement: float
    colours: float  # the named colours and no others, whatever the shapes
    shapes: float  # the named kinds of shape and no others, whatever the colours
    position: float
    count: float
    background: float
    by_kind: dict[str, float] = field(default_factory=dict)
    by_language: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        """The report as printed lines."""

        def pct(x: float) -> str:
            return f"{100 * x:.1f}%"

        return [
            f"prompts: {self.prompts} unseen combinations ({STEPS} DDIM steps, guidance {GUIDANCE})",
            f"agreement (colour and shape right): {pct(self.agreement)}",
            f"  colours right: {pct(self.colours)}, shapes right: {pct(self.shapes)}",
            "  by kind: " + ", ".join(f"{k} {pct(v)}" for k, v in self.by_kind.items()),
            "  by language: " + ", ".join(f"{k} {pct(v)}" for k, v in self.by_language.items()),
            f"also right: position {pct(self.position)}, count {pct(self.count)}, "
            f"background {pct(self.background)}",
            f"rendered and scored in {self.seconds:.0f} s",
        ]


def unseen_prompts(n: int, seed: int = 1234) -> list[tuple[sc.Scene, str, str]]:
    """``n`` (scene, language, caption) triples from the held-out side of the split."""
    rng = random.Random(seed)
    found = sc.scenes(rng, n, held_out=True)
    return [(s, lang, sc.caption(s, lang)) for s, lang in zip(found, ["en", "zh"] * n, strict=False)]


def evaluate(model_path: Path, n: int = 200, sheet: Path | None = None) -> Report:
    """Render ``n`` unseen prompts with the model at ``model_path`` through `DiffusersBackend` and score them;
    with ``sheet``, also write the pictures as a contact sheet."""
    from gpu_consumers.backends.base import FrameSpec, RenderBatch
    from gpu_consumers.backends.diffusers_backend import DiffusersBackend

    started = time.monotonic()
    backend = DiffusersBackend(model_path, "eval", device="cpu", max_batch=BATCH)
    prompts = unseen_prompts(n)
    images: list[np.ndarray] = []
    for i in range(0, n, BATCH):
        chunk = prompts[i : i + BATCH]
        frames = tuple(FrameSpec(i + j, i + j, 0.0, caption) for j, (_, _, caption) in enumerate(chunk))
        size = sc.IMAGE_SIZE
        images += backend.render(RenderBatch("eval", size, size, STEPS, GUIDANCE, None, frames))
    scores = [score(image, scene) for image, (scene, _, _) in zip(images, prompts, strict=True)]
    if sheet is not None:
        write_sheet(sheet, images, scores)
    return _report(prompts, scores, time.monotonic() - started)


def _report(prompts: list[tuple[sc.Scene, str, str]], scores: list[Score], seconds: float) -> Report:
    by_kind: dict[str, list[bool]] = defaultdict(list)
    by_language: dict[str, list[bool]] = defaultdict(list)
    for (scene, language, _), s in zip(prompts, scores, strict=True):
        by_kind[scene.kind].append(s.agreed)
        by_language[language].append(s.agreed)

    def share(values: list[bool]) -> float:
        return sum(values) / len(values) if values else 0.0

    return Report(
        prompts=len(scores),
        agreement=share([s.agreed for s in scores]),
        colours=share([s.colours_right for s in scores]),
        shapes=share([s.shapes_right for s in scores]),
        position=share([s.position_right for s in scores]),
        count=share([s.count_right for s in scores]),
        background=share([s.background_right for s in scores]),
        by_kind={k: share(v) for k, v in sorted(by_kind.items())},
        by_language={k: share(v) for k, v in sorted(by_language.items())},
        seconds=seconds,
    )


def write_sheet(path: Path, images: list[np.ndarray], scores: list[Score], columns: int = 20) -> None:
    """A grid of the pictures, each framed green (agreed) or red (not)."""
    import cv2

    framed = [
        cv2.copyMakeBorder(
            im, 2, 2, 2, 2, cv2.BORDER_CONSTANT, value=(0, 200, 0) if s.agreed else (230, 0, 0)
        )
        for im, s in zip(images, scores, strict=True)
    ]
    blank = np.zeros_like(framed[0])
    framed += [blank] * (-len(framed) % columns)
    rows = [np.hstack(framed[i : i + columns]) for i in range(0, len(framed), columns)]
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(np.vstack(rows), cv2.COLOR_RGB2BGR))
