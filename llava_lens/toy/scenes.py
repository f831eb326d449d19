"""Procedural scenes of coloured shapes with per-object masks and question/answer pairs.

A scene is a small RGB canvas holding 1-4 objects, each with a distinct shape and a distinct
colour (so every question below has exactly one right answer), on a noisy background with grey
clutter specks. Every object keeps its boolean mask and bounding box; every QA pair records which
object it asks about (``None`` for count questions). Everything is deterministic given the seed.

:class:`Style` says how a scene is drawn (the default is the original dark, noisy 64-px renderer);
:func:`random_style` draws a style per training scene so the model meets light, dark and coloured
backgrounds, outlines and fills, small and large objects, several canvas sizes, textures, noise
and anti-aliased or aliased edges.
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
# Object colours closer than this (RGB distance) to a scene's background are not used in that scene.
MIN_CONTRAST = 100
BACKGROUNDS = ("dark", "light", "colour")
NUMBERS = ("zero", "one", "two", "three", "four")
QTYPES = ("color", "shape", "count", "position", "exists")


@dataclass(frozen=True)
class Style:
    """How a scene is drawn.

    Canvas size, object radius range (fraction of size), fill/outline, background texture,
    background noise amplitude and number of clutter specks. ``background`` is ``"dark"`` (a dark
    grey, the original renderer), ``"light"`` (light grey to white) or ``"colour"`` (a random colour
    far from every object colour). ``line_width`` is the outline width in pixels (0: ``size / 32``);
    ``antialias`` draws soft edges (4x supersampled coverage) instead of hard ones.
    """

    size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    radius: tuple[float, float] = (0.10, 0.16)
    outline: bool = False
    texture: bool = False
    noise: int = 10
    clutter: int = 6
    background: str = "dark"
    line_width: int = 0
    antialias: bool = False


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


def _draw(shape: str, size: int, cx: float, cy: float, r: float, outline: bool, width: int) -> Image.Image:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    width = width or max(1, round(size / 32))
    fill, line = (None, 255) if outline else (255, None)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=line, width=width)
    elif outline:
        draw.polygon(_polygon(shape, cx, cy, r), outline=255, width=width)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=255)
    return canvas


def shape_mask(shape: str, size: int, cx: float, cy: float, r: float, outline: bool = False,
               width: int = 0) -> np.ndarray:
    """Boolean ``size x size`` mask of one shape centred at ``(cx, cy)`` with radius ``r``.

    ``width`` is the outline width in pixels (0: ``size / 32``).
    """
    return np.asarray(_draw(shape, size, cx, cy, r, outline, width)) > 0


def shape_coverage(shape: str, style: Style, cx: float, cy: float, r: float) -> np.ndarray:
    """Float ``size x size`` share of each pixel the shape covers: 0/1 when aliased, soft edges when not."""
    if not style.antialias:
        return shape_mask(shape, style.size, cx, cy, r, style.outline, style.line_width).astype(np.float32)
    k, s = 4, style.size  # draw 4x larger, then average each 4x4 block
    width = k * (style.line_width or max(1, round(s / 32)))
    big = _draw(shape, s * k, cx * k + (k - 1) / 2, cy * k + (k - 1) / 2, r * k, style.outline, width)
    return np.asarray(big.resize((s, s), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _base_colour(rng: np.random.Generator, kind: str) -> tuple[int, int, int]:
    """The background colour of a light or coloured scene (never close to an object colour)."""
    if kind == "light":
        g = int(rng.integers(185, 256))
        return g, g, g
    if kind != "colour":
        raise ValueError(f"unknown background {kind!r}; expected one of {BACKGROUNDS}")
    while True:
        rgb = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if all(math.dist(rgb, c) >= MIN_CONTRAST for c in COLORS.values()):
            return rgb


def _background(rng: np.random.Generator, style: Style, base: Optional[tuple[int, int, int]] = None) -> np.ndarray:
    s = style.size
    if base is None:  # the original dark renderer (draws from ``rng`` exactly as it always did)
        base = rng.integers(20, 45)
    img = np.empty((s, s, 3), dtype=np.int16)
    img[:] = base
    if style.texture:
        yy, xx = np.mgrid[0:s, 0:s]
        period = max(4, s // 8)
        stripes = ((xx + yy) // (period // 2)) % 2 if rng.random() < 0.5 else ((xx // period + yy // period) % 2)
        sign = -1 if np.mean(base) > 127 else 1  # darker stripes on a light canvas
        img += (sign * stripes[..., None] * rng.integers(25, 45)).astype(np.int16)
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
    base = None
    if style.background != "dark":  # its own stream, so that dark scenes stay what they always were
        base = _base_colour(np.random.default_rng([seed, 1]), style.background)
    palette = [c for c in COLORS if base is None or math.dist(COLORS[c], base) >= MIN_CONTRAST]
    colors = rng.choice(palette, size=len(spots), replace=False)
    image = _background(rng, style, base)
    objects, taken = [], np.zeros((style.size, style.size), bool)
    for (cx, cy, r), shape, color in zip(spots, shapes, colors):
        cover = shape_coverage(str(shape), style, cx, cy, r)
        mask = cover >= 0.5
        if (cover > 0)[taken].any():  # a square's corners reach past r: never let objects touch
            continue
        taken |= cover > 0
        if style.antialias:
            alpha = cover[..., None]
            image[:] = np.round(image * (1 - alpha) + np.array(COLORS[str(color)]) * alpha).astype(np.uint8)
        else:
            image[mask] = COLORS[str(color)]
        objects.append(SceneObject(str(shape), str(color), (cx, cy), _bbox(mask), mask))
    return Scene(seed, image, objects, make_qas(rng, objects, style.size))


def random_style(seed: int, sizes: tuple[int, ...] = (48, 64, 80, 96, 112, 128)) -> Style:
    """The drawing style of training scene ``seed``: a deterministic random draw of every knob.

    Backgrounds dark / light / coloured (40 / 30 / 30%), outlines 30%, large objects (radius up to a
    quarter of the canvas: diameter up to half) 30%, texture 25%, anti-aliasing 50%, noise 0-25,
    0-9 clutter specks, canvas ``sizes`` (multiples of 16 so the 8x8 patch grid divides them).
    """
    rng = np.random.default_rng([seed, 2])
    size = int(rng.choice(sizes))
    big = rng.random() < 0.3
    return Style(
        size=size, radius=(0.14, 0.25) if big else (0.08, 0.16), outline=bool(rng.random() < 0.3),
        texture=bool(rng.random() < 0.25), noise=int(rng.integers(0, 26)), clutter=int(rng.integers(0, 10)),
        background=str(rng.choice(BACKGROUNDS, p=[0.4, 0.3, 0.3])),
        line_width=int(rng.integers(max(1, size // 48), size // 20 + 1)), antialias=bool(rng.random() < 0.5),
    )


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
