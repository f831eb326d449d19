"""Procedural scenes of coloured shapes with per-object masks and question/answer pairs.

A scene is a small RGB canvas holding 1-4 objects, each with a distinct shape and a distinct
colour (so every question below has exactly one right answer), on a noisy background with grey
clutter specks. Every object keeps its boolean mask and bounding box; every QA pair records which
object it asks about (``None`` for count questions). Everything is deterministic given the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (235, 220, 50),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (240, 240, 240), "cyan": (50, 210, 220),
}
NUMBERS = ("zero", "one", "two", "three", "four")
QTYPES = ("color", "shape", "count", "position", "exists")


@dataclass(frozen=True)
class Style:
    """How a scene is drawn.

    Canvas size, object radius range (fraction of size), fill/outline, background texture,
    background noise amplitude and number of clutter specks.
    """

    size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    radius: tuple[float, float] = (0.10, 0.16)
    outline: bool = False
    texture: bool = False
    noise: int = 10
    clutter: int = 6


@dataclass
class SceneObject:
    """One object: its shape, colour name, centre, bbox ``(x0, y0, x1, y1)`` (exclusive) and mask."""

    shape: str
    color: str
    center: tuple[float, float]
    bbox: tuple[int, int, int, int]
    mask: np.ndarray = field(repr=False)


@dataclass
class QA:
    """A question, its answer sentence, its type and the object it is about (``None`` for count)."""

    question: str
    answer: str
    qtype: str
    obj: Optional[int]
    mask: Optional[np.ndarray] = field(default=None, repr=False)
    bbox: Optional[tuple[int, int, int, int]] = None


@dataclass
class Scene:
    """A rendered scene: ``image`` is an ``HxWx3`` uint8 array; ``qas`` holds one QA per type."""

    seed: int
    image: np.ndarray = field(repr=False)
    objects: list[SceneObject]
    qas: list[QA]

    def pil(self) -> Image.Image:
        """The image as a PIL RGB image."""
        return Image.fromarray(self.image, "RGB")


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if shape == "star":
        return [(cx + (r if i % 2 == 0 else r * 0.42) * math.cos(-math.pi / 2 + i * math.pi / 5),
                 cy + (r if i % 2 == 0 else r * 0.42) * math.sin(-math.pi / 2 + i * math.pi / 5))
                for i in range(10)]
    if shape == "cross":
        a, b = r, r * 0.33
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b),
               (-a, -b), (-b, -b)]
        return [(cx + x, cy + y) for x, y in pts]
    raise ValueError(f"unknown shape {shape!r}")


def shape_mask(shape: str, size: int, cx: float, cy: float, r: float, outline: bool = False) -> np.ndarray:
    """Boolean ``size x size`` mask of one shape centred at ``(cx, cy)`` with radius ``r``."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(size / 32))
    fill, line = (None, 255) if outline else (255, None)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=line, width=width)
    elif outline:
        draw.polygon(_polygon(shape, cx, cy, r), outline=255, width=width)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=255)
    return np.asarray(canvas) > 0


def _background(rng: np.random.Generator, style: Style) -> np.ndarray:
    s = style.size
    base = rng.integers(20, 45)
    img = np.full((s, s, 3), base, dtype=np.int16)
    if style.texture:
        yy, xx = np.mgrid[0:s, 0:s]
        period = max(4, s // 8)
        stripes = ((xx + yy) // (period // 2)) % 2 if rng.random() < 0.5 else ((xx // period + yy // period) % 2)
        img += (stripes[..., None] * rng.integers(25, 45)).astype(np.int16)
    if style.noise:
        img += rng.integers(-style.noise, style.noise + 1, size=img.shape, dtype=np.int16)
    for _ in range(style.clutter):  # grey specks: never one of the named colours
        x, y, g = rng.integers(0, s - 1), rng.integers(0, s - 1), rng.integers(70, 130)
        img[y:y + 2, x:x + 2] = g
    return np.clip(img, 0, 255).astype(np.uint8)


def _place(rng: np.random.Generator, style: Style, n: int) -> list[tuple[float, float, float]]:
    s, placed = style.size, []
    for _ in range(200 * n):
        if len(placed) == n:
            break
        r = rng.uniform(*style.radius) * s
        cx, cy = rng.uniform(r + 1, s - r - 1), rng.uniform(r + 1, s - r - 1)
        if all(math.hypot(cx - x, cy - y) > r + q + 2 for x, y, q in placed):
            placed.append((cx, cy, r))
    return placed


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _count_answer(n: int) -> str:
    return "there is one object ." if n == 1 else f"there are {NUMBERS[n]} objects ."


def _exists_qa(rng: np.random.Generator, objects: list[SceneObject]) -> QA:
    present = {(o.shape, o.color) for o in objects}
    if rng.random() < 0.5:
        i = int(rng.integers(len(objects)))
        o = objects[i]
        q = f"is there a {o.color} {o.shape} ?"
        return QA(q, f"yes , there is a {o.color} {o.shape} .", "exists", i, o.mask, o.bbox)
    o = objects[int(rng.integers(len(objects)))]
    mode = rng.integers(3)  # hard negatives: right shape wrong colour, right colour wrong shape
    while True:
        shape = o.shape if mode == 0 else str(rng.choice(SHAPES))
        color = o.color if mode == 1 else str(rng.choice(list(COLORS)))
        if (shape, color) not in present:
            break
    return QA(f"is there a {color} {shape} ?", f"no , there is no {color} {shape} .", "exists", None)


def _position_qa(rng: np.random.Generator, objects: list[SceneObject], size: int) -> Optional[QA]:
    margin = size * 0.08
    options = []
    for i, o in enumerate(objects):
        dx, dy = o.center[0] - size / 2, o.center[1] - size / 2
        if abs(dx) > margin:
            options.append((i, "x", "left" if dx < 0 else "right"))
        if abs(dy) > margin:
            options.append((i, "y", "top" if dy < 0 else "bottom"))
    if not options:
        return None
    i, axis, side = options[int(rng.integers(len(options)))]
    o = objects[i]
    if axis == "x":
        q, a = f"is the {o.shape} on the left or the right ?", f"the {o.shape} is on the {side} ."
    else:
        q, a = f"is the {o.shape} at the top or the bottom ?", f"the {o.shape} is at the {side} ."
    return QA(q, a, "position", i, o.mask, o.bbox)


def make_qas(rng: np.random.Generator, objects: list[SceneObject], size: int) -> list[QA]:
    """One QA pair per question type (position is skipped when every object is near the centre)."""
    i = int(rng.integers(len(objects)))
    o = objects[i]
    qas = [QA(f"what color is the {o.shape} ?", f"the {o.shape} is {o.color} .", "color", i, o.mask, o.bbox)]
    j = int(rng.integers(len(objects)))
    p = objects[j]
    qas.append(QA(f"what shape is the {p.color} object ?", f"the {p.color} object is a {p.shape} .",
                  "shape", j, p.mask, p.bbox))
    qas.append(QA("how many objects are there ?", _count_answer(len(objects)), "count", None))
    pos = _position_qa(rng, objects, size)
    if pos is not None:
        qas.append(pos)
    qas.append(_exists_qa(rng, objects))
    return qas


def make_scene(seed: int, style: Style = Style()) -> Scene:
    """Render the scene for ``seed`` in ``style``: same seed and style give identical output."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(style.min_objects, style.max_objects + 1))
    spots = _place(rng, style, n)
    shapes = rng.choice(SHAPES, size=len(spots), replace=False)
    colors = rng.choice(list(COLORS), size=len(spots), replace=False)
    image = _background(rng, style)
    objects = []
    for (cx, cy, r), shape, color in zip(spots, shapes, colors):
        mask = shape_mask(str(shape), style.size, cx, cy, r, outline=style.outline)
        image[mask] = COLORS[str(color)]
        objects.append(SceneObject(str(shape), str(color), (cx, cy), _bbox(mask), mask))
    return Scene(seed, image, objects, make_qas(rng, objects, style.size))


def blank_image(size: int = 64) -> np.ndarray:
    """A uniform dark canvas with no objects (for the does-the-model-need-the-image check)."""
    return np.full((size, size, 3), 32, dtype=np.uint8)


def vocabulary() -> list[str]:
    """Every word the generator can put in a question or answer."""
    words = set()
    for text in ("what color is the object ? shape a how many objects are there one "
                 "on left or right at top bottom yes no , . " + " ".join(NUMBERS)).split():
        words.add(text)
    words.discard("zero")
    words.update(SHAPES)
    words.update(COLORS)
    return sorted(words)
