"""The synthetic world's caption grammar: templates, paraphrases, synonyms, and the word-level
analyses training needs (minimal edits, which words name which object).

Every caption fully describes its scene. Templates come in two sets: ``train`` phrasings, the
only ones training sees, and ``held_out`` phrasings (new clause orders and relative phrases
made of the same words), which only the validation and test splits use, so that evaluation
measures whether the re-ranker reads a sentence rather than matching its templates.

Words are analysed the way BERT's pre-tokenizer splits them (runs of letters or digits, and
single punctuation marks), so that word indices here are the tokenizer's ``word_ids``.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence

Obj = tuple[str, str, str]  # (colour, shape, size)

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
PHRASINGS = ("train", "held_out")

# Words with the same meaning in the world: a caption may use any of them.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little"),
    "large": ("large", "big"),
    "purple": ("purple", "violet"),
}
CANONICAL = {w: key for key, words in SYNONYMS.items() for w in words}

# {A} and {B}: the first and second object with its article ("a small red circle"); in pair
# scenes the first is left of (axis h) or above (axis v) the second.
PLAIN_TEMPLATES = {
    "train": (
        "{A}",
        "a picture of {A}",
        "an image of {A}",
        "a photo of {A}",
        "there is {A}",
        "{A} on a dark background",
        "an image that shows {A}",
        "there is {A} in the picture",
    ),
    "held_out": ("in the picture there is {A}", "the picture shows {A}"),
}
PAIR_TEMPLATES = {
    ("h", "train"): (
        "{A} left of {B}",
        "{B} right of {A}",
        "{A} to the left of {B}",
        "{B} to the right of {A}",
        "{A} on the left and {B} on the right",
        "{B} on the right and {A} on the left",
        "{A} is to the left of {B}",
        "there is {A} to the left of {B}",
        "to the left of {B} there is {A}",
        "{B} with {A} to its left",
        "on the right is {B} and on the left is {A}",
        "{A} on the left, {B} on the right",
        # Constructions that come in both orders, so that no clause order says by itself
        # which side an object is on: only the relation words do.
        "on the left there is {A} and on the right there is {B}",
        "on the right there is {B} and on the left there is {A}",
        "{A} is on the left and {B} is on the right",
        "{B} is on the right and {A} is on the left",
        "{A} that has {B} on its right",
        "{B} that has {A} on its left",
        "left of {B} is {A}",
        "right of {A} is {B}",
    ),
    ("h", "held_out"): (
        "on the left {A}, and on the right {B}",
        "on the left is {A} and on the right is {B}",
        "to the right of {A} there is {B}",
        "{A} with {B} to its right",
        "{B} is to the right of {A}",
    ),
    ("v", "train"): (
        "{A} above {B}",
        "{B} below {A}",
        "{A} on top of {B}",
        "{B} under {A}",
        "{A} over {B}",
        "{A} at the top and {B} at the bottom",
        "{B} at the bottom and {A} at the top",
        "{A} is above {B}",
        "there is {A} above {B}",
        "below {A} there is {B}",
        "{B} with {A} above it",
        "at the bottom is {B} and at the top is {A}",
        "{A} at the top, {B} at the bottom",
        "at the top there is {A} and at the bottom there is {B}",
        "at the bottom there is {B} and at the top there is {A}",
        "{A} is at the top and {B} is at the bottom",
        "{B} is at the bottom and {A} is at the top",
        "{A} that has {B} under it",
        "{B} that has {A} over it",
        "over {B} is {A}",
        "under {A} is {B}",
    ),
    ("v", "held_out"): (
        "at the top {A}, and at the bottom {B}",
        "at the top is {A} and at the bottom is {B}",
        "above {B} there is {A}",
        "{A} with {B} below it",
        "{B} is below {A}",
    ),
}
# {G}: the groups ("two red circles and one blue square"), joined as the phrasing says.
COUNT_TEMPLATES = {
    "train": (
        "{G}",
        "a picture of {G}",
        "there are {G}",
        "an image of {G}",
        "{G} on a dark background",
        "an image that shows {G}",
        "there are {G} in the picture",
    ),
    "held_out": ("in the picture there are {G}", "the picture shows {G}"),
}
COUNT_JOINS = {"train": (" and ",), "held_out": (" and ", " with ")}
# How one object is named: "small red circle", "small circle that is red"; the held-out
# phrasings also use "red circle that is small".
OBJECT_FORMS = {
    "train": ("{size} {colour} {shape}", "{size} {shape} that is {colour}"),
    "held_out": (
        "{size} {colour} {shape}",
        "{size} {shape} that is {colour}",
        "{colour} {shape} that is {size}",
    ),
}


def words(text: str) -> list[str]:
    """``text`` split as BERT's pre-tokenizer splits it (word indices = ``word_ids``)."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def _say(word: str, rng: random.Random) -> str:
    return rng.choice(SYNONYMS.get(word, (word,)))


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def object_phrase(obj: Obj, rng: random.Random, phrasing: str = "train") -> str:
    """``obj`` named with its article in one of ``phrasing``'s forms and synonyms."""
    colour, shape, size = obj
    form = rng.choice(OBJECT_FORMS[phrasing])
    return _article(form.format(size=_say(size, rng), colour=_say(colour, rng), shape=shape))


def group_phrase(obj: Obj, count: int, rng: random.Random) -> str:
    """``count`` copies of ``obj``: "two red circles"."""
    colour, shape, _ = obj
    return f"{NUMBERS[count]} {_say(colour, rng)} {shape}{'s' if count > 1 else ''}"


def compose(
    kind: str,
    objects: Sequence[Obj],
    rng: random.Random,
    phrasing: str = "train",
    axis: str = "",
    counts: Sequence[int] = (),
) -> str:
    """A caption of a scene (``kind`` plain, pair or count) in one of ``phrasing``'s
    templates."""
    if phrasing not in PHRASINGS:
        raise ValueError(f"phrasing must be one of {PHRASINGS}, not {phrasing!r}")
    if kind == "plain":
        template = rng.choice(PLAIN_TEMPLATES[phrasing])
        return template.format(A=object_phrase(objects[0], rng, phrasing))
    if kind == "pair":
        template = rng.choice(PAIR_TEMPLATES[(axis, phrasing)])
        a, b = (object_phrase(o, rng, phrasing) for o in objects)
        return template.format(A=a, B=b)
    groups = [group_phrase(o, n, rng) for o, n in zip(objects, counts, strict=True)]
    rng.shuffle(groups)
    join = rng.choice(COUNT_JOINS[phrasing])
    return rng.choice(COUNT_TEMPLATES[phrasing]).format(G=join.join(groups))


def vocabulary() -> list[str]:
    """Every word any caption can use."""
    out = set(COLOURS) | set(SHAPES) | set(SIZES) | set(NUMBERS.values()) | {"an"}
    out |= {f"{s}s" for s in SHAPES} | set(CANONICAL)
    templates = [
        *(t for ts in PLAIN_TEMPLATES.values() for t in ts),
        *(t for ts in PAIR_TEMPLATES.values() for t in ts),
        *(t for ts in COUNT_TEMPLATES.values() for t in ts),
        *(f for fs in OBJECT_FORMS.values() for f in fs),
        *(j for js in COUNT_JOINS.values() for j in js),
    ]
    for t in templates:
        out |= set(words(re.sub(r"\{\w+\}", " ", t)))
    return sorted(out)


# Word categories a minimal edit may swap or replace within (by meaning, so "little" is never
# replaced by "small"); "one" stays: changing it would break the plural.
_EDIT_CATEGORIES: tuple[tuple[str, ...], ...] = (
    COLOURS,
    SHAPES,
    tuple(f"{s}s" for s in SHAPES),
    SIZES,
    ("two", "three", "four"),
)
_FLIPS = {
    "left": "right",
    "right": "left",
    "above": "below",
    "below": "above",
    "under": "above",
    "over": "under",
}
_PLURAL = {f"{s}s": s for s in SHAPES}
_MODIFIERS = {*SIZES, *NUMBERS.values(), *COLOURS}


def _meaning(word: str) -> str:
    return CANONICAL.get(word, word)


def _objects(ws: Sequence[str]) -> list[tuple[list[int], str, str]]:
    """Per noun phrase of a caption: its word indices, colour and shape (canonical).

    A phrase is a shape noun with the colour, size and number words right before it, plus a
    trailing "that is <colour or size>".
    """
    out = []
    for i, w in enumerate(ws):
        shape = _PLURAL.get(w, w)
        if shape not in SHAPES:
            continue
        at, j = [i], i - 1
        while j >= 0 and _meaning(ws[j]) in _MODIFIERS:
            at.insert(0, j)
            j -= 1
        trailing = ws[i + 3] if ws[i + 1 : i + 3] == ["that", "is"] and i + 3 < len(ws) else ""
        if _meaning(trailing) in _MODIFIERS:
            at.append(i + 3)
        colours = [_meaning(ws[k]) for k in at if _meaning(ws[k]) in COLOURS]
        out.append((at, colours[0] if len(colours) == 1 else "", shape))
    return out


def count_groups(text: str) -> list[tuple[str, str, str]]:
    """A caption's (number, colour, shape) groups, sorted: two count captions with the same
    groups describe the same scene whatever their order."""
    ws = words(text)
    groups = []
    for at, colour, shape in _objects(ws):
        numbers = [ws[k] for k in at if ws[k] in NUMBERS.values()]
        groups.append((numbers[0] if numbers else "", colour, shape))
    return sorted(groups)


def _phrase_spans(ws: Sequence[str]) -> list[tuple[int, int]]:
    """Per noun phrase, its ``[start, end)`` word span with the article ("a small red circle",
    "an orange square that is large")."""
    spans = []
    for at, _, _ in _objects(ws):
        start = at[0] - 1 if at[0] > 0 and ws[at[0] - 1] in ("a", "an") else at[0]
        spans.append((start, at[-1] + 1))
    return spans


def construction(ws: Sequence[str]) -> tuple[str, ...]:
    """A caption's words with each noun phrase (article included) as one ``{X}`` slot."""
    out: list[str] = []
    at = 0
    for start, end in _phrase_spans(ws):
        out += [*ws[at:start], "{X}"]
        at = end
    return (*out, *ws[at:])


def clause_order(text: str) -> str:
    """A two-object caption's construction as text ("{X} with {X} to its left"): the group
    ``python -m edje.train evaluate --by construction`` reports R@1 by."""
    return " ".join(construction(words(text)))


@functools.cache
def constructions(phrasing: str = "train") -> frozenset[tuple[str, ...]]:
    """The constructions (:func:`construction`) of ``phrasing``'s two-object templates."""
    objects = {"A": "a red circle", "B": "a blue square"}
    return frozenset(
        construction(words(t.format(**objects)))
        for (_, ph), templates in PAIR_TEMPLATES.items()
        if ph == phrasing
        for t in templates
    )


def _swap_phrases(ws: list[str]) -> tuple[list[str], list[int]] | None:
    """A two-object caption with its two noun phrases exchanged ("a red circle left of a blue
    square" -> "a blue square left of a red circle"): the position-swapped scene, the relation
    confuser. The changed words are the exchanged phrases' words that now differ (all of their
    words when the two phrases differ in length)."""
    spans = _phrase_spans(ws)
    if len(spans) != 2:
        return None
    (a0, a1), (b0, b1) = spans
    a, b = ws[a0:a1], ws[b0:b1]
    out = ws[:a0] + b + ws[a1:b0] + a + ws[b1:]
    if len(a) == len(b):
        changed = [i for i in range(len(ws)) if out[i] != ws[i]]
    else:
        changed = [*range(a0, a0 + len(b)), *range(b0 + len(b) - len(a), b1)]
    return (out, changed) if out != ws else None


def edit_caption(
    text: str, rng: random.Random, phrasing: str = "train"
) -> tuple[str, list[int]] | None:
    """A minimal edit of a world caption that no longer describes its scene, or ``None``.

    Three families of edit, drawn evenly (then one edit uniformly within the family), so that
    relations are edited as often as bindings in a two-object caption:

    * ``binding``: swap two words of one kind that differ in meaning (colours, shapes, sizes or
      counts);
    * ``replace``: one such word by another of another meaning;
    * ``relation``: flip a relation word (left/right, above/below, top/bottom) where the result
      is a construction of ``phrasing``'s templates (:func:`constructions`), or exchange the
      two objects' phrases.

    Returns the edited caption (words joined by spaces, which the tokenizer reads as the
    original spacing) and the indices of its changed words, so training can label exactly
    which words the image contradicts.
    """
    ws = words(text)
    families: dict[str, list[tuple[list[str], list[int]]]] = {
        "binding": [],
        "replace": [],
        "relation": [],
    }
    for category in _EDIT_CATEGORIES:
        at = [i for i, w in enumerate(ws) if _meaning(w) in category]
        for i in at:
            for j in at:
                if i < j and _meaning(ws[i]) != _meaning(ws[j]):
                    swapped = list(ws)
                    swapped[i], swapped[j] = ws[j], ws[i]
                    families["binding"].append((swapped, [i, j]))
            other = rng.choice([w for w in category if w != _meaning(ws[i])])
            families["replace"].append((ws[:i] + [_say(other, rng)] + ws[i + 1 :], [i]))
    for i, w in enumerate(ws):
        flipped = None
        if w in _FLIPS:
            flipped = ws[:i] + [_FLIPS[w]] + ws[i + 1 :]
        elif w in ("top", "bottom") and i > 0 and ws[i - 1] == "the":
            flipped = ws[:i] + ["bottom" if w == "top" else "top"] + ws[i + 1 :]
        # Only into a construction that the phrasing's true captions use: a flip elsewhere
        # ("... on the left and ... on the left", or a clause order no true caption has) is
        # refuted by the text alone, and would put held-out clause orders into training.
        if flipped is not None and construction(flipped) in constructions(phrasing):
            families["relation"].append((flipped, [i]))
    groups = count_groups(text)
    counted = any(number for number, _, _ in groups)
    if not counted and (swap := _swap_phrases(ws)) is not None:
        families["relation"].append(swap)
    # Count groups may come in any order: an edit that only reorders them (swapping the
    # colours of two groups of equal count and shape) still describes the scene.
    kept = [
        [
            (e, at)
            for e, at in ((" ".join(w), at) for w, at in edits)
            if not counted or count_groups(e) != groups
        ]
        for edits in families.values()
    ]
    nonempty = [k for k in kept if k]
    return rng.choice(rng.choice(nonempty)) if nonempty else None


def phrase_objects(text: str) -> list[tuple[str, str] | None]:
    """Per word of a caption, the (colour, shape) its noun phrase names, or ``None``: the
    size, colour and shape of "a small red circle" (or of "a small circle that is red") all
    name (red, circle)."""
    ws = words(text)
    out: list[tuple[str, str] | None] = [None] * len(ws)
    for at, colour, shape in _objects(ws):
        if colour:
            for k in at:
                out[k] = (colour, shape)
    return out
