"""The synthetic world: splits, the caption grammar and its held-out phrasings, minimal edits,
noun phrases, and the three rendering styles."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from edje import synthetic
from edje import world_captions as W
from edje.training.data import patch_object_mix, world_tokenizer


def _pixels(split: str, seed: int) -> list[bytes]:
    return [ex.image.tobytes() for ex in synthetic.generate(split, seed, max_scenes=20)]


def test_world_is_deterministic_by_seed():
    a = list(synthetic.generate("test", seed=3, max_scenes=20))
    b = list(synthetic.generate("test", seed=3, max_scenes=20))
    assert [ex.image.tobytes() for ex in a] == [ex.image.tobytes() for ex in b]
    assert [ex.captions for ex in a] == [ex.captions for ex in b]
    assert _pixels("test", 3) != _pixels("test", 4)


def test_splits_are_disjoint_and_hold_the_hard_twins():
    splits = synthetic.split_scenes(seed=0)
    keys = {name: {s.key for s in scenes} for name, scenes in splits.items()}
    groups = {name: {s.group for s in scenes} for name, scenes in splits.items()}
    for x, y in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not keys[x] & keys[y]
        assert not groups[x] & groups[y]
    test = splits["test"]
    assert {s.caption_kind for s in test} == {"plain", "relation", "attribute_swap", "count"}
    # Every test pair scene's colour-swapped and position-swapped twins are test scenes too.
    for scene in (s for s in test if s.caption_kind == "attribute_swap"):
        (c1, s1, z1), (c2, s2, z2) = scene.objects
        swapped = synthetic.Scene("pair", ((c2, s1, z1), (c1, s2, z2)), scene.axis)
        moved = synthetic.Scene("pair", scene.objects[::-1], scene.axis)
        assert {swapped.key, moved.key} <= keys["test"]


def _template_pattern(template: str) -> re.Pattern:
    """A regex matching any caption made from ``template`` (each slot: an object phrase)."""
    parts = re.split(r"\{[AB]\}", template)
    return re.compile("^" + "an? [a-z ]+?".join(re.escape(p) for p in parts) + "$")


def test_held_out_phrasings_never_reach_training():
    train = [c for s in synthetic.split_scenes(0)["train"][::5] for c in synthetic.all_captions(s)]
    # The templates each split uses: no training caption has a held-out pair template's
    # clause order, and no held-out object form ("red circle that is small") occurs.
    for (axis, phrasing), templates in W.PAIR_TEMPLATES.items():
        if phrasing == "held_out":
            patterns = [_template_pattern(t) for t in templates]
            assert not [c for c in train if any(p.match(c) for p in patterns)], axis
    colours, sizes = "|".join(W.COLOURS + ("violet",)), "small|little|large|big"
    held_form = re.compile(rf"\b({colours}) (circle|square|triangle) that is ({sizes})\b")
    assert not [c for c in train if held_form.search(c)]
    assert any(held_form.search(c) for c in synthetic.all_captions(
        synthetic.split_scenes(0)["test"][100], "held_out", draws=200
    ))  # fmt: skip
    with pytest.raises(ValueError, match="never training"):
        next(synthetic.generate("train", phrasing="held_out"))
    with pytest.raises(ValueError, match="never training"):
        next(synthetic.generate("train", style="held_out"))


def test_held_out_phrasings_use_only_training_words():
    def template_words(phrasing: str) -> set[str]:
        templates = [
            *W.PLAIN_TEMPLATES[phrasing],
            *W.PAIR_TEMPLATES[("h", phrasing)],
            *W.PAIR_TEMPLATES[("v", phrasing)],
            *W.COUNT_TEMPLATES[phrasing],
            *W.OBJECT_FORMS[phrasing],
            *W.COUNT_JOINS[phrasing],
        ]
        return {w for t in templates for w in W.words(re.sub(r"\{\w+\}", " ", t))}

    assert template_words("held_out") <= template_words("train")
    assert template_words("held_out") != template_words("train")


def test_captions_use_the_world_vocabulary():
    tokenizer = world_tokenizer(64)
    vocab = set(synthetic.vocabulary())
    for phrasing in W.PHRASINGS:
        for ex in synthetic.generate(
            "val", 0, captions_per_image=3, max_scenes=50, phrasing=phrasing
        ):
            for text in ex.captions:
                assert set(W.words(text)) <= vocab
                assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]


def test_grammar_paraphrases_and_synonyms():
    scene = synthetic.Scene(
        "pair", (("purple", "circle", "small"), ("red", "square", "large")), "h"
    )
    captions = synthetic.all_captions(scene, draws=400)
    assert len(captions) > 50
    assert any("violet" in c for c in captions) and any("purple" in c for c in captions)
    assert any("little" in c for c in captions) and any("big" in c for c in captions)
    assert any(c.startswith("to the left of") for c in captions)  # clause orders vary


def test_write_karpathy_round_trips(tmp_path):
    from edje_client.evaluation import KarpathyDataset

    path = synthetic.write_karpathy(tmp_path, "test", seed=0, max_scenes=6, captions_per_image=2)
    data = KarpathyDataset.load(path, split="test")
    assert len(data.images) == 6 and len(data.captions) == 12
    assert all(p.is_file() for p in data.images)
    assert set(data.caption_kind) <= {"plain", "relation", "attribute_swap", "count"}


def _describes(scene: synthetic.Scene, text: str) -> bool:
    """Whether ``text`` is (word for word) one of many captions of ``scene``."""
    target = W.words(text)
    rng = random.Random(1)
    return any(
        W.words(synthetic.caption(scene, rng, phrasing)) == target
        for phrasing in W.PHRASINGS
        for _ in range(600)
    )


def test_edits_contradict_the_scene():
    rng = random.Random(0)
    scenes = synthetic.all_scenes()[::23]
    kinds_edited = set()
    for scene in scenes:
        for phrasing, text in [
            *(("train", t) for t in synthetic.all_captions(scene)[:3]),
            *(("held_out", t) for t in synthetic.all_captions(scene, "held_out")[:2]),
        ]:
            edited = synthetic.edit_caption(text, rng, phrasing)
            assert edited is not None, text
            new, changed = edited
            before, after = W.words(text), W.words(new)
            assert len(before) == len(after) and changed
            differ = [i for i in range(len(before)) if before[i] != after[i]]
            if differ != sorted(changed):
                # Two noun phrases of different lengths exchanged: the same words reordered,
                # every object word labelled, and the words between them only shifted.
                assert sorted(before) == sorted(after), (text, new)
                rest = [w for i, w in enumerate(after) if i not in changed]
                assert not [w for w in rest if W._meaning(w) in (*W._MODIFIERS, *W.SHAPES)]
                unchanged = iter(before)
                assert all(w in unchanged for w in rest), (text, new)  # in their order
            assert not _describes(scene, new), (text, new)
            kinds_edited.add(scene.caption_kind)
    assert kinds_edited == {"plain", "relation", "attribute_swap", "count"}
    assert synthetic.edit_caption("a picture of", rng) is None
    # Reordering equal groups is no edit: "two red circles and two blue circles".
    same = synthetic.Scene("count", (("red", "circle", "count"), ("blue", "circle", "count")),
                           counts=(2, 2))  # fmt: skip
    for _ in range(50):
        new, _ = synthetic.edit_caption("two red circles and two blue circles", rng)
        assert not _describes(same, new), new


def test_edits_keep_to_the_constructions_training_captions_use():
    # A flipped relation word that makes a construction no true training caption has (a
    # held-out clause order, or "on the left ... on the left") is refuted by the text alone.
    rng = random.Random(0)
    train = W.constructions("train")
    assert W.construction(W.words("a red circle that is small left of a blue square")) in train
    assert W.constructions("held_out").isdisjoint(train)
    pairs = [s for s in synthetic.split_scenes(0)["train"] if s.kind == "pair"][::40]
    flips = 0
    for scene in pairs:
        for text in synthetic.all_captions(scene):
            assert W.construction(W.words(text)) in train, text
            for _ in range(6):
                new, _ = synthetic.edit_caption(text, rng)
                assert W.construction(W.words(new)) in train, (text, new)
                relation = ("left", "right", "above", "below", "under", "over", "top", "bottom")
                flips += any(W.words(new).count(w) != W.words(text).count(w) for w in relation)
    assert flips > 0
    # "is to the left of" has no mirror among training's templates: no flip, the exchange stays.
    text = "a red circle is to the left of a blue square"
    edits = {synthetic.edit_caption(text, rng)[0] for _ in range(300)}
    assert "a red circle is to the right of a blue square" not in edits
    assert "a blue square is to the left of a red circle" in edits
    assert "a red circle right of a blue square" in {
        synthetic.edit_caption("a red circle left of a blue square", rng)[0] for _ in range(300)
    }


def test_relation_edits_are_a_third_of_a_pair_captions_edits():
    rng = random.Random(0)
    text = "a small circle that is red left of a large blue square"
    edits = [synthetic.edit_caption(text, rng) for _ in range(600)]
    swapped = "a large blue square left of a small circle that is red"
    assert sum(new == swapped for new, _ in edits) > 40  # the phrase exchange is drawn
    relation = sum(W.words(new).count("left") == 0 or new == swapped for new, _ in edits)
    assert 150 < relation < 250  # the relation family: a third of the draws
    new, changed = next(e for e in edits if e[0] == swapped)
    both = "a large blue square a small circle that is red"
    assert [W.words(new)[i] for i in changed] == W.words(both)


def test_synonyms_are_never_an_edit():
    rng = random.Random(0)
    for _ in range(200):
        new, changed = synthetic.edit_caption(
            "a little violet circle left of a big red square", rng
        )
        pairs = {(W.words("a little violet circle left of a big red square")[i], W.words(new)[i])
                 for i in changed}  # fmt: skip
        assert not {("little", "small"), ("violet", "purple"), ("big", "large")} & pairs


def test_phrase_words_name_their_object():
    red_circle = synthetic.object_class(("red", "circle", ""))
    blue_square = synthetic.object_class(("blue", "square", ""))
    assert synthetic.phrase_classes("a small red circle left of a large blue square") == [
        0, red_circle, red_circle, red_circle, 0, 0, 0, blue_square, blue_square, blue_square
    ]  # fmt: skip
    assert synthetic.phrase_classes("two red circles and one blue square") == [
        red_circle, red_circle, red_circle, 0, blue_square, blue_square, blue_square
    ]  # fmt: skip
    # Relative phrases and commas: "on the left a circle that is red, and ..."
    text = "on the left a little circle that is red, and on the right a blue square that is big"
    classes = synthetic.phrase_classes(text)
    assert len(classes) == len(W.words(text))
    named = {w: c for w, c in zip(W.words(text), classes, strict=True) if c}
    assert named == {
        "little": red_circle, "circle": red_circle, "red": red_circle,
        "blue": blue_square, "square": blue_square, "big": blue_square,
    }  # fmt: skip


def test_label_maps_match_the_images():
    plain = list(synthetic.generate("val", seed=1, max_scenes=12))
    labelled = list(synthetic.generate("val", seed=1, max_scenes=12, labels=True))
    for a, b in zip(plain, labelled, strict=True):
        assert a.image.tobytes() == b.image.tobytes()  # asking for labels changes nothing
        pixels = np.asarray(b.image)
        background = pixels[b.labels == 0]
        assert (background == background[0]).all()  # unlabelled pixels are the background
        want = {synthetic.object_class(o) for o in b.scene.objects}
        assert set(np.unique(b.labels)) - {0} == want
    mix = patch_object_mix(torch.from_numpy(np.stack([e.labels for e in labelled])), 8)
    assert mix.shape == (12, 64, synthetic.NUM_OBJECT_CLASSES)
    torch.testing.assert_close(mix.sum(-1), torch.ones(12, 64))


@pytest.mark.parametrize("style", ["augmented", "held_out"])
def test_styles_draw_the_same_scenes_differently(style):
    other = list(synthetic.generate("val", seed=2, max_scenes=40, labels=True, style=style))
    assert {e.scene.key for e in other} <= {s.key for s in synthetic.split_scenes(2)["val"]}
    assert all(e.image.size == (64, 64) for e in other)
    for e in other:
        # The label map still holds exactly the scene's objects, where the image is bright.
        want = {synthetic.object_class(o) for o in e.scene.objects}
        assert set(np.unique(e.labels)) - {0} == want
        pixels = np.asarray(e.image).astype(float).max(-1)
        assert pixels[e.labels > 0].mean() > pixels[e.labels == 0].mean() + 60
    # Not the plain drawing: its backgrounds are flat, these are not (gradient or noise).
    flat = [np.asarray(e.image)[e.labels == 0].std(0).max() < 1 for e in other]
    assert sum(flat) < len(flat) * (0.8 if style == "augmented" else 0.05)


def test_tiers_cover_the_test_split():
    assert set(synthetic.TIERS) == {"seen", "held_out_phrasing", "held_out_rendering"}
    scenes = {s.key for s in synthetic.split_scenes(0)["test"]}
    for tier in synthetic.TIERS:
        keys = [ex.scene.key for ex in synthetic.generate_tier("test", tier, max_scenes=30)]
        assert len(keys) == 30 and set(keys) <= scenes
    with pytest.raises(ValueError, match="tier"):
        synthetic.generate_tier("test", "unseen")


def test_clause_order_names_a_caption_by_its_template():
    assert W.clause_order("a small red circle with a big square that is blue to its left") == (
        "{X} with {X} to its left"
    )
    assert W.clause_order(
        "on the left there is a red circle and on the right there is a blue square"
    ) == ("on the left there is {X} and on the right there is {X}")


def test_constructions_that_come_in_both_orders():
    # Constructions whose mirror (relation words exchanged) training also uses: in them only
    # the relation words say which side each object is on, never the clause order.
    flip = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
    flip |= {"over": "under", "under": "over"}
    both_orders = [
        "{X} on the left and {X} on the right",
        "{X} at the top and {X} at the bottom",
        "on the left there is {X} and on the right there is {X}",
        "{X} is on the left and {X} is on the right",
        "{X} that has {X} on its right",
        "left of {X} is {X}",
        "at the top there is {X} and at the bottom there is {X}",
        "{X} is at the top and {X} is at the bottom",
        "{X} that has {X} under it",
        "over {X} is {X}",
    ]
    train, held_out = W.constructions("train"), W.constructions("held_out")
    for text in both_orders:
        c = tuple(text.split())
        mirror = tuple(flip.get(w, w) for w in c)
        assert c in train and mirror in train, text
        assert c not in held_out and mirror not in held_out, text
