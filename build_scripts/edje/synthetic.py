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
the test gallery holds the swapped twins that embedding models confuse.

Captions come from :mod:`edje.world_captions` (a grammar of paraphrases and synonyms, with
phrasings that only evaluation uses) and images from :mod:`edje.world_render` (training draws
in the ``augmented`` style; the ``held_out`` style never reaches training). Everything is
deterministic given the seed; rendering is Pillow only.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from edje.world_captions import (
    NUMBERS,
    SHAPES,
    SIZES,
    SYNONYMS,
    Obj,
    compose,
    edit_caption,
    phrase_objects,
    vocabulary,
)
from edje.world_render import NUM_OBJECT_CLASSES, PALETTE, draw_scene
from edje.world_render import object_class as _class_of
from edje_client.evaluation import is_hard

COLOURS = PALETTE
SPLITS = ("train", "val", "test")
CAPTION_KINDS = ("plain", "relation", "attribute_swap", "count")  # a caption's ``kind`` tag
# The hard subset, as edje_client.evaluation defines it (every kind but plain).
HARD_KINDS = tuple(kind for kind in CAPTION_KINDS if is_hard(kind))
# Evaluation tiers: the test scenes drawn and phrased as in training, in held-out phrasings
# (templates training never sees), and in the held-out rendering style.
TIERS: dict[str, tuple[str, str]] = {
    "seen": ("plain", "train"),
    "held_out_phrasing": ("plain", "held_out"),
    "held_out_rendering": ("held_out", "train"),
}


def object_class(obj: Obj) -> int:
    """Label-map value of an object: 1 + colour * len(SHAPES) + shape (0 is background)."""
    return _class_of(obj[0], obj[1])


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


def class_counts(scene: Scene) -> np.ndarray:
    """int [classes]: how many objects of each class (:func:`object_class`) ``scene`` holds."""
    out = np.zeros(NUM_OBJECT_CLASSES, dtype=np.int64)
    for obj, n in zip(scene.objects, scene.counts or (1,) * len(scene.objects), strict=True):
        out[object_class(obj)] += n
    return out


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


def caption(scene: Scene, rng: random.Random, phrasing: str = "train") -> str:
    """A caption for ``scene`` in one of ``phrasing``'s templates (each fully describes it)."""
    return compose(scene.kind, scene.objects, rng, phrasing, scene.axis, scene.counts)


def all_captions(scene: Scene, phrasing: str = "train", draws: int = 48) -> list[str]:
    """The distinct captions of ``draws`` seeded draws for ``scene`` (training's captions)."""
    rng = random.Random(scene.key)
    return sorted({caption(scene, rng, phrasing) for _ in range(draws)})


# Relation words and the object each one points at: "left" in "a red circle left of a blue
# square" names the object further left (axis 1: x, -1: the smaller coordinate).
RELATION_POINTS: dict[str, tuple[int, int]] = {
    "left": (1, -1),
    "right": (1, 1),
    "above": (0, -1),
    "over": (0, -1),
    "top": (0, -1),
    "below": (0, 1),
    "under": (0, 1),
    "bottom": (0, 1),
}

# Words that say something about the image, by kind. Training masks a whole kind at once (all
# colours of a caption, say): with one colour left visible, the other follows by elimination,
# with none left, naming them means binding each colour to its shape and place in the image.
WORD_GROUPS: dict[str, tuple[str, ...]] = {
    "colour": (*COLOURS, *SYNONYMS["purple"][1:]),
    "shape": (*SHAPES, *(f"{s}s" for s in SHAPES)),
    "size": (*SYNONYMS["small"], *SYNONYMS["large"]),
    "number": tuple(NUMBERS.values()),
    "relation": tuple(RELATION_POINTS),
}


def phrase_classes(text: str) -> list[int]:
    """Per word of a caption (:func:`edje.world_captions.words`), the object class
    (:func:`object_class`) its noun phrase names, or 0. Training teaches such words to look
    at the image cells of that object."""
    return [_class_of(*named) if named else 0 for named in phrase_objects(text)]


def render(
    scene: Scene,
    rng: random.Random,
    size: int = 64,
    labels: bool = False,
    style: str = "plain",
) -> Image.Image | tuple[Image.Image, np.ndarray]:
    """Draw ``scene`` in ``style`` (:mod:`edje.world_render`) with random jitter; with
    ``labels``, also return the label map ``[size, size]`` uint8 (:func:`object_class` per
    pixel), which stage-1 training uses as dense supervision for the small ViT."""
    image, label_map = draw_scene(
        scene.kind, scene.objects, scene.axis, scene.counts, rng, size, style, labels
    )
    return (image, label_map) if labels else image


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
    style: str | None = None,
    phrasing: str = "train",
) -> Iterator[Example]:
    """Render ``split`` deterministically: each scene (optionally a seeded subset of at most
    ``max_scenes``) ``images_per_scene`` times in ``style`` (default: ``augmented`` for
    train, ``plain`` otherwise), each image with captions in ``phrasing`` (and, with
    ``labels``, its label map in ``Example.labels``; the images are the same either way).
    The held-out style and phrasings are refused for the train split."""
    style = style or ("augmented" if split == "train" else "plain")
    if split == "train" and "held_out" in (style, phrasing):
        raise ValueError("the held-out style and phrasings are for evaluation, never training")
    scenes = split_scenes(seed)[split]
    variant = "" if (style, phrasing) == ("plain", "train") else f":{style}:{phrasing}"
    rng = random.Random(_seed_for(seed, split + variant))
    if max_scenes is not None and max_scenes < len(scenes):
        scenes = rng.sample(scenes, max_scenes)
    for scene in scenes:
        for _ in range(images_per_scene):
            drawn = render(scene, rng, image_size, labels, style)
            image, label_map = drawn if labels else (drawn, None)
            caps = [caption(scene, rng, phrasing) for _ in range(captions_per_image)]
            yield Example(image, scene, caps, label_map)


def generate_tier(split: str, tier: str, seed: int = 0, **kwargs) -> Iterator[Example]:
    """:func:`generate` for one evaluation tier of :data:`TIERS`, one image per scene."""
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {tuple(TIERS)}, not {tier!r}")
    style, phrasing = TIERS[tier]
    return generate(split, seed, style=style, phrasing=phrasing, **kwargs)


def write_karpathy(
    out_dir: str | Path, split: str = "test", seed: int = 0, tier: str | None = None, **kwargs
) -> Path:
    """Write ``split`` (in evaluation ``tier``, if given) as ``out_dir/images/*.png`` plus
    ``out_dir/dataset.json`` (Karpathy format, each sentence with its ``kind``). Extra keyword
    arguments go to :func:`generate`."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    examples = (
        generate(split, seed, **kwargs)
        if tier is None
        else generate_tier(split, tier, seed, **kwargs)
    )
    for i, ex in enumerate(examples):
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
    "COLOURS",
    "HARD_KINDS",
    "NUMBERS",
    "NUM_OBJECT_CLASSES",
    "RELATION_POINTS",
    "SHAPES",
    "SIZES",
    "TIERS",
    "WORD_GROUPS",
    "edit_caption",
    "object_class",
    "phrase_classes",
    "Example",
    "Scene",
    "all_scenes",
    "caption",
    "generate",
    "generate_tier",
    "render",
    "split_scenes",
    "vocabulary",
    "write_karpathy",
]
