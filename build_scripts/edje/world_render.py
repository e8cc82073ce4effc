"""The synthetic world's renderer (Pillow and numpy), in three styles.

* ``plain``: flat dark background, hard-edged shapes, the base palette with a little jitter.
* ``augmented`` (training): per image, at random, anti-aliasing (drawn at 4x and reduced),
  gradient backgrounds, wider shade jitter and brightness, rotated squares and triangles, and
  size jitter.
* ``held_out`` (validation and test only, never in training): the plain drawing seen through a
  camera: Gaussian blur, sensor noise and JPEG compression.

Every style draws the same scene description, and each can return the label map (the object
class of every pixel) that stage-1 training uses.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from edje.world_captions import SHAPES, Obj

STYLES = ("plain", "augmented", "held_out")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 220, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
RADIUS = {"small": 7, "large": 12, "count": 5}
NUM_OBJECT_CLASSES = 1 + len(PALETTE) * len(SHAPES)  # background + every (colour, shape)


def object_class(colour: str, shape: str) -> int:
    """Label-map value of an object: 1 + colour * len(SHAPES) + shape (0 is background)."""
    return 1 + list(PALETTE).index(colour) * len(SHAPES) + SHAPES.index(shape)


class _Style:
    """One image's random rendering choices."""

    def __init__(self, style: str, rng: random.Random) -> None:
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, not {style!r}")
        aug = style == "augmented"
        self.supersample = 4 if aug and rng.random() < 0.5 else 1
        self.gradient = aug and rng.random() < 0.5
        self.shade = 45 if aug else 25
        self.brightness = rng.uniform(0.8, 1.1) if aug else 1.0
        self.max_rotation = 25.0 if aug and rng.random() < 0.5 else 0.0
        self.size_jitter = 0.15 if aug else 0.0
        self.camera = style == "held_out"


def _background(size: int, style: _Style, rng: random.Random) -> Image.Image:
    first = np.array([rng.randint(10, 50) for _ in range(3)], dtype=np.float32)
    if not style.gradient:
        return Image.new("RGB", (size, size), tuple(int(v) for v in first))
    second = np.array([rng.randint(5, 70) for _ in range(3)], dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = np.cos(angle) * xx + np.sin(angle) * yy - min(0, np.cos(angle)) - min(0, np.sin(angle))
    t = t / (abs(np.cos(angle)) + abs(np.sin(angle)))
    pixels = first + (second - first) * t[..., None]
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    if shape == "square":
        corners = [(-r, -r), (r, -r), (r, r), (-r, r)]
    else:
        corners = [(0, -r), (-r, r * 0.8), (r, r * 0.8)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]


class _Canvas:
    def __init__(self, size: int, style: _Style, rng: random.Random, labels: bool) -> None:
        self.size, self.style, self.rng, k = size, style, rng, style.supersample
        self.image = _background(size * k, style, rng)
        self.draw = ImageDraw.Draw(self.image)
        self.labels = Image.new("L", (size * k, size * k), 0) if labels else None
        self.label_draw = ImageDraw.Draw(self.labels) if labels else None

    def radius(self, size_word: str) -> float:
        jitter = self.style.size_jitter
        return RADIUS[size_word] * self.size / 64 * self.rng.uniform(1 - jitter, 1 + jitter)

    def shape(self, obj: Obj, cx: float, cy: float, r: float) -> None:
        colour, shape, _ = obj
        st, rng, k = self.style, self.rng, self.style.supersample
        fill = tuple(
            int(np.clip(v * st.brightness + rng.randint(-st.shade, st.shade), 0, 255))
            for v in PALETTE[colour]
        )
        angle = math.radians(rng.uniform(-st.max_rotation, st.max_rotation))
        cx, cy, r = cx * k, cy * k, r * k
        for canvas, value in ((self.draw, fill), (self.label_draw, object_class(colour, shape))):
            if canvas is None:
                continue
            if shape == "circle":
                canvas.ellipse((cx - r, cy - r, cx + r, cy + r), fill=value)
            else:
                canvas.polygon(_outline(shape, cx, cy, r, angle), fill=value)

    def finish(self) -> tuple[Image.Image, np.ndarray | None]:
        image, labels = self.image, self.labels
        if self.style.supersample > 1:
            image = image.resize((self.size, self.size), Image.Resampling.BOX)
            if labels is not None:
                labels = labels.resize((self.size, self.size), Image.Resampling.NEAREST)
        if self.style.camera:
            image = _camera(image, self.rng)
        return image, (np.asarray(labels) if labels is not None else None)


def _camera(image: Image.Image, rng: random.Random) -> Image.Image:
    """Blur, sensor noise and JPEG: the held-out style's degradations."""
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.0)))
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 8, (*image.size[::-1], 3))
    image = Image.fromarray((np.asarray(image) + noise).clip(0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=rng.randint(35, 60))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def draw_scene(
    kind: str,
    objects: tuple[Obj, ...],
    axis: str,
    counts: tuple[int, ...],
    rng: random.Random,
    size: int = 64,
    style: str = "plain",
    labels: bool = False,
) -> tuple[Image.Image, np.ndarray | None]:
    """Draw a scene with random jitter (position, shade, background) in ``style``; returns the
    image and, with ``labels``, its label map ``[size, size]`` uint8, else ``None``."""
    canvas = _Canvas(size, _Style(style, rng), rng, labels)
    s = size / 64
    if kind == "plain":
        r = canvas.radius(objects[0][2])
        cx, cy = (rng.uniform(r + 2, size - r - 2) for _ in range(2))
        canvas.shape(objects[0], cx, cy, r)
    elif kind == "pair":
        ra, rb = (canvas.radius(o[2]) for o in objects)
        # Along the axis: the first before the second with a gap; across it: nearly aligned.
        first = rng.uniform(ra + 1, size - ra - 2 * rb - 4)
        along = [first, rng.uniform(first + ra + rb + 2, size - rb - 1)]
        mid = rng.uniform(14 * s, size - 14 * s)
        across = [mid + rng.uniform(-3, 3) * s, mid + rng.uniform(-3, 3) * s]
        for obj, r, u, v in zip(objects, (ra, rb), along, across, strict=True):
            canvas.shape(obj, *((u, v) if axis == "h" else (v, u)), r)
    else:
        placed: list[tuple[float, float]] = []
        for obj, n in zip(objects, counts, strict=True):
            for _ in range(n):
                r = canvas.radius("count")
                for _attempt in range(100):
                    x, y = (rng.uniform(r + 1, size - r - 1) for _ in range(2))
                    if all((x - u) ** 2 + (y - v) ** 2 > (2 * r + 2) ** 2 for u, v in placed):
                        break
                placed.append((x, y))
                canvas.shape(obj, x, y, r)
    return canvas.finish()
