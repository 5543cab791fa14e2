"""Procedural scenes: a background colour and one to three flat shapes, drawn by OpenCV and captioned in
English or Chinese.

A `Scene` is the structured meaning of a caption; `draw` paints it (64x64 RGB by default) and `caption` says
it
in words, optionally leaving out the size, the position or the background (the picture still has them, so
every
caption is true of its picture). Three kinds of scene:

- ``single``: one shape of a size at a position ("a big red circle on the left on a blue background");
- ``pair``: two shapes side by side or one above the other ("a red circle on the left of a blue square");
- ``count``: two or three small shapes of one colour and kind in a row ("three yellow triangles").

`combination` names the attributes whose joint values decide the train/unseen split: a scene whose combination
hashes into the held-out share is never drawn for training, so the evaluation asks for pairings of colour,
shape
and background (or of two shapes) the model has never seen together.

Consumes: a `random.Random`. Produces: `Scene` values, uint8 HxWx3 RGB arrays and caption strings.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import cv2
import numpy as np

IMAGE_SIZE = 64
# RGB. Far apart in hue or brightness so a blurry 64 px picture still names its colours.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {**COLOURS, "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "big")
POSITIONS = ("left", "right", "top", "bottom", "middle")
RELATIONS = ("left of", "above")
COUNTS = {2: "two", 3: "three"}
KINDS = ("single", "pair", "count")

ZH_COLOURS = {
    "red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "white": "白色",
    "black": "黑色", "grey": "灰色",
}  # fmt: skip
ZH_SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
ZH_SIZES = {"small": "小", "big": "大"}
ZH_POSITIONS = {"left": "左边", "right": "右边", "top": "上方", "bottom": "下方", "middle": "中间"}
ZH_COUNTS = {1: "一个", 2: "两个", 3: "三个"}
ZH_COMMA = "\uff0c"  # the full-width comma of Chinese text
EN_POSITIONS = {
    "left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
    "middle": "in the middle",
}  # fmt: skip

# Share of combinations held out of training, for the unseen-combination evaluation.
HELD_OUT_SHARE = 0.2
_RADIUS = {"small": 0.12, "big": 0.21}  # of the image side
_CENTRES = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "middle": (0.5, 0.5),
}


@dataclass(frozen=True)
class Shape:
    """One shape of a scene."""

    colour: str
    shape: str
    size: str
    position: str  # for pairs and counts, the slot the layout put it in


@dataclass(frozen=True)
class Scene:
    """What a caption means: the kind of scene, its background and its shapes."""

    kind: str
    background: str
    shapes: tuple[Shape, ...]
    relation: str | None = None  # pairs: "left of" or "above" (first shape relative to the second)

    def combination(self) -> tuple[str, ...]:
        """The joint attribute values that decide whether this scene is held out of training."""
        first = self.shapes[0]
        if self.kind == "pair":
            second = self.shapes[1]
            return ("pair", first.colour, first.shape, second.colour, second.shape)
        if self.kind == "count":
            return ("count", first.colour, first.shape, str(len(self.shapes)))
        return ("single", first.colour, first.shape, self.background)

    def held_out(self) -> bool:
        """Whether this scene's attribute combination is kept out of training (a fixed hash share)."""
        digest = hashlib.sha256("/".join(self.combination()).encode()).digest()
        return int.from_bytes(digest[:4], "big") < HELD_OUT_SHARE * 2**32


def _two_colours(rng: random.Random, k: int) -> tuple[list[str], str]:
    """``k`` object colours (not necessarily distinct) and a background unlike all of them."""
    colours = [rng.choice(list(COLOURS)) for _ in range(k)]
    background = rng.choice([b for b in BACKGROUNDS if b not in colours])
    return colours, background


def random_scene(rng: random.Random, kind: str | None = None) -> Scene:
    """A random scene of ``kind`` (drawn by weight when None)."""
    kind = kind or rng.choices(KINDS, weights=(0.5, 0.3, 0.2))[0]
    if kind == "single":
        (colour,), background = _two_colours(rng, 1)
        shape = Shape(colour, rng.choice(SHAPES), rng.choice(SIZES), rng.choice(POSITIONS))
        return Scene("single", background, (shape,))
    if kind == "pair":
        relation = rng.choice(RELATIONS)
        colours, background = _two_colours(rng, 2)
        kinds = [rng.choice(SHAPES), rng.choice(SHAPES)]
        if colours[0] == colours[1] and kinds[0] == kinds[1]:
            kinds[1] = rng.choice([s for s in SHAPES if s != kinds[0]])
        slots = ("left", "right") if relation == "left of" else ("top", "bottom")
        pair = tuple(Shape(c, s, "big", p) for c, s, p in zip(colours, kinds, slots, strict=True))
        return Scene("pair", background, pair, relation)
    (colour,), background = _two_colours(rng, 1)
    kind_of_shape = rng.choice(SHAPES)
    n = rng.choice(list(COUNTS))
    row: tuple[str, ...] = ("left", "right") if n == 2 else ("left", "middle", "right")
    return Scene("count", background, tuple(Shape(colour, kind_of_shape, "small", p) for p in row))


def scenes(rng: random.Random, n: int, *, held_out: bool) -> list[Scene]:
    """``n`` random scenes from the training side (``held_out=False``) or the unseen side of the split."""
    found: list[Scene] = []
    while len(found) < n:
        scene = random_scene(rng)
        if scene.held_out() == held_out:
            found.append(scene)
    return found


def _centre(scene: Scene, shape: Shape) -> tuple[float, float]:
    if scene.kind == "single":
        return _CENTRES[shape.position]
    if scene.kind == "pair":
        return {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73)}[
            shape.position
        ]
    n = len(scene.shapes)
    xs = {2: {"left": 0.3, "right": 0.7}, 3: {"left": 0.18, "middle": 0.5, "right": 0.82}}[n]
    return xs[shape.position], 0.5


def draw(scene: Scene, size: int = IMAGE_SIZE, rng: random.Random | None = None) -> np.ndarray:
    """The scene as an RGB uint8 array; ``rng`` jitters positions and sizes a little (training variety)."""
    scale = 4  # draw large, then shrink: anti-aliased edges at any size
    big = size * scale
    image = np.empty((big, big, 3), np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    for shape in scene.shapes:
        cx, cy = _centre(scene, shape)
        radius = _RADIUS[shape.size]
        if scene.kind != "single":
            radius = 0.11 if scene.kind == "count" else 0.17
        if rng is not None:
            cx += rng.uniform(-0.04, 0.04)
            cy += rng.uniform(-0.04, 0.04)
            radius *= rng.uniform(0.85, 1.15)
        _paint(image, shape.shape, cx * big, cy * big, radius * big, COLOURS[shape.colour])
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def _paint(image: np.ndarray, shape: str, cx: float, cy: float, r: float, rgb: tuple[int, int, int]) -> None:
    colour = tuple(int(c) for c in rgb)
    if shape == "circle":
        cv2.circle(image, (round(cx), round(cy)), round(r), colour, thickness=-1, lineType=cv2.LINE_AA)
        return
    if shape == "square":
        side = r * 0.9  # half side: a square looks as big as a circle of radius r
        points = [
            (cx - side, cy - side),
            (cx + side, cy - side),
            (cx + side, cy + side),
            (cx - side, cy + side),
        ]
    else:  # an upright equilateral-ish triangle inscribed in the circle, a little enlarged
        rr = r * 1.15
        points = [(cx, cy - rr), (cx + rr * 0.866, cy + rr * 0.5), (cx - rr * 0.866, cy + rr * 0.5)]
    cv2.fillPoly(image, [np.round(np.array(points)).astype(np.int32)], colour, lineType=cv2.LINE_AA)


def _plural(shape: str) -> str:
    return shape + "s"


def caption(scene: Scene, language: str = "en", rng: random.Random | None = None) -> str:
    """The scene in words; with ``rng``, the size, position or background are sometimes left out."""

    def keep(p: float) -> bool:
        return rng is None or rng.random() < p

    bg = keep(0.8)
    first = scene.shapes[0]
    if language == "en":
        tail = f" on a {scene.background} background" if bg else ""
        if scene.kind == "single":
            size = f"{first.size} " if keep(0.7) else ""
            where = f" {EN_POSITIONS[first.position]}" if keep(0.7) else ""
            return f"a {size}{first.colour} {first.shape}{where}{tail}"
        if scene.kind == "pair":
            second = scene.shapes[1]
            relation = "to the left of" if scene.relation == "left of" else "above"
            return f"a {first.colour} {first.shape} {relation} a {second.colour} {second.shape}{tail}"
        return f"{COUNTS[len(scene.shapes)]} {first.colour} {_plural(first.shape)}{tail}"
    if language != "zh":
        raise ValueError(f"language must be 'en' or 'zh', got {language!r}")
    head = f"{ZH_COLOURS[scene.background]}背景上" if bg else ""
    if scene.kind == "single":
        size = ZH_SIZES[first.size] if keep(0.7) else ""
        where = ZH_POSITIONS[first.position] if keep(0.7) else ""
        de = "的" if head or where else ""
        return f"{head}{where}{de}一个{size}{ZH_COLOURS[first.colour]}{ZH_SHAPES[first.shape]}"
    if scene.kind == "pair":
        second = scene.shapes[1]
        side = "左边" if scene.relation == "left of" else "上方"
        lead = f"{head}{ZH_COMMA}" if head else ""
        return (
            f"{lead}一个{ZH_COLOURS[first.colour]}{ZH_SHAPES[first.shape]}在一个"
            f"{ZH_COLOURS[second.colour]}{ZH_SHAPES[second.shape]}的{side}"
        )
    de = "的" if head else ""
    return f"{head}{de}{ZH_COUNTS[len(scene.shapes)]}{ZH_COLOURS[first.colour]}{ZH_SHAPES[first.shape]}"


def all_captions() -> list[str]:
    """Every word the captions use, in both languages: one caption per template and attribute value."""
    words = [
        *COLOURS, *BACKGROUNDS, *SHAPES, *map(_plural, SHAPES), *SIZES, *COUNTS.values(),
        "a", "on", "the", "at", "in", "of", "to", "background", "left", "right", "top", "bottom", "middle",
        "above",
    ]  # fmt: skip
    chinese = [
        *ZH_COLOURS.values(), *ZH_SHAPES.values(), *ZH_SIZES.values(), *ZH_POSITIONS.values(),
        *ZH_COUNTS.values(), "背景上", "的", "在", ZH_COMMA,
    ]  # fmt: skip
    return [" ".join(words), *chinese]
