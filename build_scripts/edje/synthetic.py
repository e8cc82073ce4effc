"""A synthetic compositional image-caption world for training and testing the default EDJE.

Scenes hold coloured shapes on a dark background (64 px by default):

* ``plain``: one object, e.g. "a large red circle".
* ``pair``: two objects side by side or stacked, e.g. "a small red circle left of a large blue
  square". Its captions are tagged ``relation`` or, when the two objects differ in colour and
  shape (so the colour-swapped scene exists), ``attribute_swap``.
* ``count``: one or two groups of small identical objects, e.g. "two red circles and one blue
  square" (tag ``count``).

Scenes are split by *group*: all scenes that differ only in binding (which colour goes with which
shape, which object is where, which group has which count) share a group, and a group lies in
exactly one split. Train, validation and test therefore have disjoint scene descriptions, and
the test gallery holds the swapped twins that embedding models confuse. Everything is
deterministic given the seed; rendering is Pillow only (about 10k images per second).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from edje_client.evaluation import is_hard

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 220, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
SPLITS = ("train", "val", "test")
CAPTION_KINDS = ("plain", "relation", "attribute_swap", "count")  # a caption's ``kind`` tag
# The hard subset, as edje_client.evaluation defines it (every kind but plain).
HARD_KINDS = tuple(kind for kind in CAPTION_KINDS if is_hard(kind))
RADIUS = {"small": 7, "large": 12, "count": 5}

Obj = tuple[str, str, str]  # (colour, shape, size)
PAIR_TEMPLATES = {
    "h": (
        "a {a} left of a {b}",
        "a {b} right of a {a}",
        "a {a} to the left of a {b}",
        "a {b} to the right of a {a}",
        "a {a} on the left and a {b} on the right",
    ),
    "v": (
        "a {a} above a {b}",
        "a {b} below a {a}",
        "a {a} on top of a {b}",
        "a {b} under a {a}",
        "a {a} at the top and a {b} at the bottom",
    ),
}
PLAIN_TEMPLATES = ("a {a}", "a picture of a {a}", "a {a} on a dark background")
COUNT_TEMPLATES = ("{g}", "a picture of {g}", "there are {g}")


@dataclass(frozen=True)
class Scene:
    """A scene description. ``objects`` are ``(colour, shape, size)``; for ``pair`` the first
    is left of (``axis="h"``) or above (``axis="v"``) the second; for ``count`` ``counts[i]``
    copies of ``objects[i]`` (size ``"count"``)."""

    kind: str
    objects: tuple[Obj, ...]
    axis: str = ""
    counts: tuple[int, ...] = ()

    @property
    def key(self) -> str:
        """Canonical description string (equal scenes have equal keys)."""
        parts = ["/".join(o) for o in self.objects]
        return f"{self.kind}|{self.axis}|{','.join(parts)}|{','.join(map(str, self.counts))}"

    @property
    def group(self) -> str:
        """Scenes that differ only in binding share a group (and so a split)."""
        colours = sorted({o[0] for o in self.objects})
        shapes = sorted({o[1] for o in self.objects})
        sizes = sorted(o[2] for o in self.objects)
        return f"{self.kind}|{self.axis}|{colours}|{shapes}|{sizes}|{sorted(self.counts)}"

    @property
    def caption_kind(self) -> str:
        if self.kind == "pair":
            (c1, s1, _), (c2, s2, _) = self.objects
            return "attribute_swap" if c1 != c2 and s1 != s2 else "relation"
        return self.kind


def all_scenes() -> list[Scene]:
    """Every scene description of the world, in a fixed order."""
    objs = [(c, s, z) for c in COLOURS for s in SHAPES for z in SIZES]
    scenes = [Scene("plain", (o,)) for o in objs]
    for axis in ("h", "v"):
        scenes += [Scene("pair", (a, b), axis) for a in objs for b in objs if a != b]
    kinds = [(c, s, "count") for c in COLOURS for s in SHAPES]
    scenes += [Scene("count", (k,), counts=(n,)) for k in kinds for n in (2, 3, 4)]
    for i, a in enumerate(kinds):
        for b in kinds[i + 1 :]:
            for n1 in (1, 2, 3):
                for n2 in (1, 2, 3):
                    if n1 + n2 > 2:
                        scenes.append(Scene("count", (a, b), counts=(n1, n2)))
    return scenes


def _phrase(obj: Obj, count: int | None = None) -> str:
    colour, shape, size = obj
    if count is None:
        return f"{size} {colour} {shape}"
    return f"{NUMBERS[count]} {colour} {shape}{'s' if count > 1 else ''}"


def caption(scene: Scene, rng: random.Random) -> str:
    """A caption for ``scene`` in a random template (every caption fully describes it)."""
    if scene.kind == "plain":
        return rng.choice(PLAIN_TEMPLATES).format(a=_phrase(scene.objects[0]))
    if scene.kind == "pair":
        a, b = (_phrase(o) for o in scene.objects)
        return rng.choice(PAIR_TEMPLATES[scene.axis]).format(a=a, b=b)
    groups = [_phrase(o, n) for o, n in zip(scene.objects, scene.counts, strict=True)]
    rng.shuffle(groups)
    return rng.choice(COUNT_TEMPLATES).format(g=" and ".join(groups))


def all_captions(scene: Scene) -> list[str]:
    """Every caption the templates give for ``scene`` (for mining and tests)."""
    out: set[str] = set()
    rng = random.Random(0)
    for _ in range(64):
        out.add(caption(scene, rng))
    return sorted(out)


def vocabulary() -> list[str]:
    """Every word any caption can use."""
    words = set(COLOURS) | set(SHAPES) | set(SIZES) | set(NUMBERS.values())
    words |= {f"{s}s" for s in SHAPES}
    for t in (*PLAIN_TEMPLATES, *COUNT_TEMPLATES, *PAIR_TEMPLATES["h"], *PAIR_TEMPLATES["v"]):
        words |= {w for w in t.replace("{a}", "").replace("{b}", "").replace("{g}", "").split()}
    return sorted(words | {"and"})


_EDIT_CATEGORIES: tuple[tuple[str, ...], ...] = (
    tuple(COLOURS),
    SHAPES,
    tuple(f"{s}s" for s in SHAPES),
    SIZES,
    ("two", "three", "four"),  # "one" stays: changing it would break the plural
)
_FLIPS = {"left": "right", "right": "left", "above": "below", "below": "above", "under": "above"}

# Relation words and the object each one points at: "left" in "a red circle left of a blue
# square" names the object further left (axis 1: x, -1: the smaller coordinate).
RELATION_POINTS: dict[str, tuple[int, int]] = {
    "left": (1, -1),
    "right": (1, 1),
    "above": (0, -1),
    "top": (0, -1),
    "below": (0, 1),
    "under": (0, 1),
    "bottom": (0, 1),
}


# Words that say something about the image, by kind. Training masks a whole kind at once (all
# colours of a caption, say): with one colour left visible, the other follows by elimination,
# with none left, naming them means binding each colour to its shape and place in the image.
WORD_GROUPS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": (*SHAPES, *(f"{s}s" for s in SHAPES)),
    "size": SIZES,
    "number": tuple(NUMBERS.values()),
    "relation": tuple(RELATION_POINTS),
}


def edit_caption(text: str, rng: random.Random) -> tuple[str, list[int]] | None:
    """A minimal edit of a world caption that no longer describes its scene, or ``None``.

    One of: swap two different words of one kind (colours, shapes, sizes or counts: a binding
    error), replace one such word by another of its kind, or flip a relation word (left/right,
    above/below). Returns the edited caption and the indices of the changed words, so training
    can label exactly which words the image contradicts.
    """
    words = text.split()
    edits: list[tuple[str, list[int]]] = []
    for category in _EDIT_CATEGORIES:
        at = [i for i, w in enumerate(words) if w in category]
        for i in at:
            for j in at:
                if i < j and words[i] != words[j]:
                    swapped = list(words)
                    swapped[i], swapped[j] = words[j], words[i]
                    edits.append((" ".join(swapped), [i, j]))
            other = rng.choice([w for w in category if w != words[i]])
            edits.append((" ".join(words[:i] + [other] + words[i + 1 :]), [i]))
    for i, w in enumerate(words):
        if w in _FLIPS:
            edits.append((" ".join(words[:i] + [_FLIPS[w]] + words[i + 1 :]), [i]))
        elif w in ("top", "bottom") and i > 0 and words[i - 1] == "the":
            flipped = "bottom" if w == "top" else "top"
            edits.append((" ".join(words[:i] + [flipped] + words[i + 1 :]), [i]))

    # Groups joined by "and" may come in any order: an edit that only reorders them (swapping
    # the colours of two groups of equal count and shape) still describes the scene.
    def groups(caption: str) -> list[str]:
        for prefix in ("a picture of ", "there are "):
            caption = caption.removeprefix(prefix)
        return sorted(caption.split(" and "))

    edits = [e for e in edits if groups(e[0]) != groups(text)]
    return rng.choice(edits) if edits else None


NUM_OBJECT_CLASSES = 1 + len(COLOURS) * len(SHAPES)  # background + every (colour, shape)


def object_class(obj: Obj) -> int:
    """Label-map value of an object: 1 + colour * len(SHAPES) + shape (0 is background)."""
    return 1 + list(COLOURS).index(obj[0]) * len(SHAPES) + SHAPES.index(obj[1])


def phrase_classes(text: str) -> list[int]:
    """Per word of a caption, the object class (:func:`object_class`) its noun phrase names,
    or 0: the size, colour and shape of "a small red circle" (or the number, colour and shape
    of "two red circles") all name (red, circle). Training teaches such words to look at the
    image cells of that object."""
    words = text.split()
    plural = {f"{s}s": s for s in SHAPES}
    modifiers = {*SIZES, *NUMBERS.values()}
    out = [0] * len(words)
    for i in range(len(words) - 1):
        colour, shape = words[i], plural.get(words[i + 1], words[i + 1])
        if colour in COLOURS and shape in SHAPES:
            out[i] = out[i + 1] = object_class((colour, shape, ""))
            if i > 0 and words[i - 1] in modifiers:
                out[i - 1] = out[i]
    return out


def _draw(draw, obj: Obj, cx: float, cy: float, r: float, rng, label_draw=None) -> None:
    colour, shape, _ = obj
    fill = tuple(int(np.clip(v + rng.randint(-25, 25), 0, 255)) for v in COLOURS[colour])
    box = (cx - r, cy - r, cx + r, cy + r)
    triangle = [(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)]
    for canvas, value in ((draw, fill), (label_draw, object_class(obj))):
        if canvas is None:
            continue
        if shape == "circle":
            canvas.ellipse(box, fill=value)
        elif shape == "square":
            canvas.rectangle(box, fill=value)
        else:
            canvas.polygon(triangle, fill=value)


def render(
    scene: Scene, rng: random.Random, size: int = 64, labels: bool = False
) -> Image.Image | tuple[Image.Image, np.ndarray]:
    """Draw ``scene`` with random jitter (position, colour shade, background).

    With ``labels``, also return the label map ``[size, size]`` uint8 (:func:`object_class`
    per pixel), which stage-1 training uses as dense supervision for the small ViT.
    """
    bg = tuple(rng.randint(10, 50) for _ in range(3))
    image = Image.new("RGB", (size, size), bg)
    label_image = Image.new("L", (size, size), 0) if labels else None
    draw = ImageDraw.Draw(image)
    label_draw = ImageDraw.Draw(label_image) if labels else None
    s = size / 64
    if scene.kind == "plain":
        r = RADIUS[scene.objects[0][2]] * s
        cx, cy = (rng.uniform(r + 2, size - r - 2) for _ in range(2))
        _draw(draw, scene.objects[0], cx, cy, r, rng, label_draw)
    elif scene.kind == "pair":
        (a, b), (ra, rb) = scene.objects, [RADIUS[o[2]] * s for o in scene.objects]
        # Along the axis: a before b with a gap; across it: nearly aligned.
        first = rng.uniform(ra + 1, size - ra - 2 * rb - 4)
        along = [first, rng.uniform(first + ra + rb + 2, size - rb - 1)]
        mid = rng.uniform(14 * s, size - 14 * s)
        across = [mid + rng.uniform(-3, 3) * s, mid + rng.uniform(-3, 3) * s]
        for obj, r, u, v in zip((a, b), (ra, rb), along, across, strict=True):
            _draw(draw, obj, *((u, v) if scene.axis == "h" else (v, u)), r, rng, label_draw)
    else:
        r = RADIUS["count"] * s
        placed: list[tuple[float, float]] = []
        for obj, n in zip(scene.objects, scene.counts, strict=True):
            for _ in range(n):
                for _attempt in range(100):
                    x, y = (rng.uniform(r + 1, size - r - 1) for _ in range(2))
                    if all((x - u) ** 2 + (y - v) ** 2 > (2 * r + 2) ** 2 for u, v in placed):
                        break
                placed.append((x, y))
                _draw(draw, obj, x, y, r, rng, label_draw)
    return (image, np.asarray(label_image)) if labels else image


def split_scenes(
    seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> dict[str, list[Scene]]:
    """Assign whole groups to train/val/test; scene descriptions never cross splits."""
    groups: dict[str, list[Scene]] = {}
    for scene in all_scenes():
        groups.setdefault(scene.group, []).append(scene)
    names = sorted(groups)
    random.Random(seed).shuffle(names)
    out: dict[str, list[Scene]] = {s: [] for s in SPLITS}
    # Split each scene kind separately, so every split has every kind.
    for kind in ("plain", "pair", "count"):
        kind_names = [n for n in names if n.startswith(kind + "|")]
        cut1 = round(len(kind_names) * fractions[0])
        cut2 = cut1 + max(1, round(len(kind_names) * fractions[1]))
        for split, part in zip(
            SPLITS, (kind_names[:cut1], kind_names[cut1:cut2], kind_names[cut2:]), strict=True
        ):
            out[split] += [s for n in part for s in groups[n]]
    return out


@dataclass
class Example:
    """One rendered image with its scene and captions (each caption has a ``kind`` tag)."""

    image: Image.Image
    scene: Scene
    captions: list[str] = field(default_factory=list)
    labels: np.ndarray | None = None  # [H, W] uint8 object classes, when asked for

    @property
    def kind(self) -> str:
        return self.scene.caption_kind


def _seed_for(seed: int, split: str) -> int:
    return int(hashlib.sha1(f"{seed}:{split}".encode()).hexdigest()[:8], 16)


def generate(
    split: str,
    seed: int = 0,
    images_per_scene: int = 1,
    captions_per_image: int = 1,
    max_scenes: int | None = None,
    image_size: int = 64,
    labels: bool = False,
) -> Iterator[Example]:
    """Render ``split`` deterministically: each scene (optionally a seeded subset of at most
    ``max_scenes``) ``images_per_scene`` times, each image with its captions (and, with
    ``labels``, its label map in ``Example.labels``; the images are the same either way)."""
    scenes = split_scenes(seed)[split]
    rng = random.Random(_seed_for(seed, split))
    if max_scenes is not None and max_scenes < len(scenes):
        scenes = rng.sample(scenes, max_scenes)
    for scene in scenes:
        for _ in range(images_per_scene):
            drawn = render(scene, rng, image_size, labels)
            image, label_map = drawn if labels else (drawn, None)
            caps = [caption(scene, rng) for _ in range(captions_per_image)]
            yield Example(image, scene, caps, label_map)


def write_karpathy(out_dir: str | Path, split: str = "test", seed: int = 0, **kwargs) -> Path:
    """Write ``split`` as ``out_dir/images/*.png`` plus ``out_dir/dataset.json`` (Karpathy format,
    each sentence with its ``kind``). Extra keyword arguments go to :func:`generate`."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, ex in enumerate(generate(split, seed, **kwargs)):
        name = f"{split}_{i:06d}.png"
        ex.image.save(out / "images" / name)
        entries.append(
            {
                "filename": name,
                "filepath": "images",
                "split": split,
                "imgid": i,
                "scene": ex.scene.key,
                "sentences": [{"raw": c, "kind": ex.kind} for c in ex.captions],
            }
        )
    path = out / "dataset.json"
    path.write_text(json.dumps({"dataset": "edje-synthetic", "images": entries}, indent=1))
    return path


__all__ = [
    "CAPTION_KINDS",
    "HARD_KINDS",
    "Example",
    "Scene",
    "all_scenes",
    "caption",
    "generate",
    "render",
    "split_scenes",
    "vocabulary",
    "write_karpathy",
]
