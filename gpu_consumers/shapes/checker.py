"""Does a picture show its caption? An OpenCV detector of colour and shape, scored against a `Scene`.

`detect` finds the background colour (the median of the border) and every blob that is not background: each
pixel is named by its nearest palette colour, each colour's pixels are cleaned by a morphological opening and
split into contours, and each contour big enough to be a shape is named by how much of its bounding box it
fills (a square ~1, a circle ~0.79, a triangle ~0.5) and how many corners its polygon has. `score` compares
the
detections with the scene: the caption is *agreed* when every shape it names is found with its colour and kind
and nothing else of a size to count is there; position, count and background are reported beside it.

Consumes: HxWx3 uint8 RGB arrays and `Scene` values. Produces: `Detection` lists and `Score` values.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import cv2
import numpy as np

from gpu_consumers.shapes.scenes import BACKGROUNDS, Scene

WORK_SIZE = 128  # analyse at this size: contours of a 64 px picture are too coarse to measure
MIN_AREA = 0.006  # of the image: smaller blobs are specks, not shapes
_FILL_SQUARE = 0.86
_FILL_SQUARE_CORNERS = (
    0.8  # a small square's corners are rounded by anti-aliasing; four corners still say square
)
_FILL_CIRCLE = 0.64


@dataclass(frozen=True)
class Detection:
    """One shape found in a picture: its colour and kind, where it is and how big."""

    colour: str
    shape: str
    centre: tuple[float, float]  # x, y as fractions of the image side
    area: float  # fraction of the image


@dataclass(frozen=True)
class Score:
    """How far a picture shows its scene: agreement, and which attributes came out right."""

    agreed: bool  # every named shape found with its colour and kind, and nothing else
    colours_right: bool
    shapes_right: bool
    count_right: bool
    position_right: bool
    background_right: bool


def _palette() -> tuple[list[str], np.ndarray]:
    names = list(BACKGROUNDS)
    lab = cv2.cvtColor(np.array([[BACKGROUNDS[n] for n in names]], np.uint8), cv2.COLOR_RGB2LAB)[0]
    return names, lab.astype(np.float32)


_NAMES, _LAB = _palette()


def name_pixels(image: np.ndarray) -> np.ndarray:
    """Index into the palette (`BACKGROUNDS` order) of the nearest colour of each pixel, in Lab space."""
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)
    distances = ((lab[:, :, None, :] - _LAB[None, None, :, :]) ** 2).sum(-1)
    return distances.argmin(-1)


def _shape_of(contour: np.ndarray) -> str:
    area = cv2.contourArea(contour)
    _, _, w, h = cv2.boundingRect(contour)
    fill = area / max(w * h, 1)
    corners = len(cv2.approxPolyDP(contour, 0.04 * cv2.arcLength(contour, True), True))
    if fill >= _FILL_SQUARE or (corners == 4 and fill >= _FILL_SQUARE_CORNERS):
        return "square"
    if fill < _FILL_CIRCLE or corners == 3:
        return "triangle"
    return "circle"


def detect(image: np.ndarray) -> tuple[str, list[Detection]]:
    """The background's colour name and the shapes found on it."""
    image = cv2.resize(image, (WORK_SIZE, WORK_SIZE), interpolation=cv2.INTER_CUBIC)
    named = name_pixels(image)
    border = np.concatenate([named[0], named[-1], named[:, 0], named[:, -1]])
    background = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3))
    total = WORK_SIZE * WORK_SIZE
    found: list[Detection] = []
    for index, name in enumerate(_NAMES):
        if index == background or name not in _COLOUR_NAMES:
            continue
        mask = cv2.morphologyEx((named == index).astype(np.uint8), cv2.MORPH_OPEN, kernel)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        for contour in contours:
            area = cv2.contourArea(contour)
            if area < MIN_AREA * total:
                continue
            m = cv2.moments(contour)
            centre = (m["m10"] / m["m00"] / WORK_SIZE, m["m01"] / m["m00"] / WORK_SIZE)
            found.append(Detection(name, _shape_of(contour), centre, area / total))
    return _NAMES[background], found


_COLOUR_NAMES = {n for n in BACKGROUNDS if n != "grey"}


def _position_right(scene: Scene, found: list[Detection]) -> bool:
    if scene.kind == "single":
        (d,) = found
        x, y = d.centre
        position = scene.shapes[0].position
        return {
            "left": x < 0.42, "right": x > 0.58, "top": y < 0.42, "bottom": y > 0.58,
            "middle": 0.35 < x < 0.65 and 0.35 < y < 0.65,
        }[position]  # fmt: skip
    if scene.kind == "pair":
        first = [d for d in found if (d.colour, d.shape) == (scene.shapes[0].colour, scene.shapes[0].shape)]
        second = [d for d in found if (d.colour, d.shape) == (scene.shapes[1].colour, scene.shapes[1].shape)]
        axis = 0 if scene.relation == "left of" else 1
        return bool(first and second) and first[0].centre[axis] < second[0].centre[axis]
    return True


def score(image: np.ndarray, scene: Scene) -> Score:
    """How far ``image`` shows ``scene``; see the module docstring for what *agreed* means."""
    background, found = detect(image)
    wanted = Counter((s.colour, s.shape) for s in scene.shapes)
    got = Counter((d.colour, d.shape) for d in found)
    kinds_right = set(got) == set(wanted)
    colours_right = {c for c, _ in got} == {c for c, _ in wanted}
    shapes_right = {s for _, s in got} == {s for _, s in wanted}
    count_right = got == wanted
    return Score(
        agreed=kinds_right,
        colours_right=colours_right,
        shapes_right=shapes_right,
        count_right=count_right,
        position_right=count_right and _position_right(scene, found),
        background_right=background == scene.background,
    )
