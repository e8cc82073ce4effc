"""Linear probes: what the frozen ViT's patch features say about the synthetic world.

A re-ranker can only verify what its image tokens carry. These probes fit a linear classifier
(held-out accuracy) on the last hidden state of a first-stage ViT over rendered validation
images, for:

* ``position``: which of the P patches a feature came from;
* ``patch_colour`` / ``patch_shape``: the object covering more than half of a patch;
* ``object_shape``: an object's shape from the mean feature of the patches it covers (> 30%).

Chance is 1/P, 1/6 and 1/3. Run on a stage-1 checkpoint of the default ``Recipe``'s sizes
(``python -m edje.train default --stage1-cache FILE`` writes one), or on a model source's ViT::

    python -m edje.tools.probes --stage1 build/stage1.pt
    python -m edje.tools.probes --source build_scripts/edje/default_model

With ``--source``, a second probe asks whether the *joint encoder* uses the image: every word
of one kind (all colours, all shapes, ...) of a validation caption is masked and predicted
through the MLM head, once with the caption's own image and once with another scene's. With
no masked word left to eliminate from, only the image can tell "a small [MASK] circle left of
a large [MASK] square"; an encoder that ignores its image scores the same on both. A third
probe (``where``) reads, from the last hidden state of each word that names an object in a
two-object caption, which half of the image (along the pair's axis) that object is in, again
with the own image and another's: relations can only be checked if words carry this. Its
``twin_image_follows_image`` reads the same words with each scene's position-swapped twin's
image through the classifier fitted on own-image words, against where the twin holds each
object: 1.0 if the words follow the image, 0.0 if they follow the caption's word order.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edje import synthetic


def probe_accuracy(
    x: torch.Tensor,
    y: torch.Tensor,
    transfer: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
    steps: int = 300,
) -> float:
    """Held-out (30%) accuracy of a linear softmax classifier on centred, scaled ``x``; with
    ``transfer=(x2, y2)``, the same classifier's accuracy on those rows of ``x2`` instead."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = perm[: int(0.7 * len(x))], perm[int(0.7 * len(x)) :]
    mean = x[train].mean(0)
    scale = (x[train] - mean).std() + 1e-8
    x = (x - mean) / scale  # one scale for all columns: sparse columns stay sparse
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        linear = nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(linear(x[train]), y[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    if transfer is not None:
        x, y = (transfer[0] - mean) / scale, transfer[1]
    with torch.no_grad():
        return float((linear(x[test]).argmax(1) == y[test]).float().mean())


def feature_probes(features: torch.Tensor, labels: torch.Tensor, patch: int) -> dict[str, float]:
    """Probe ``features`` [N, P, D] against the renderer's label maps [N, H, W]."""
    from edje.training.data import patch_object_mix

    n, p, _ = features.shape
    features = features.float()
    mix = patch_object_mix(labels, patch)  # [N, P, C]; class c - 1 = colour * 3 + shape
    share, cls = mix[..., 1:].max(-1)
    covered = share > 0.5
    shapes = len(synthetic.SHAPES)
    objects, object_shape = [], []
    for i in range(n):
        for c in labels[i].unique().tolist():
            where = mix[i, :, c] > 0.3 if c else None
            if where is not None and where.any():
                objects.append(features[i, where].mean(0))
                object_shape.append((c - 1) % shapes)
    report = {
        "position": probe_accuracy(features.reshape(n * p, -1), torch.arange(p).repeat(n)),
        "patch_colour": probe_accuracy(features[covered], cls[covered] // shapes),
        "patch_shape": probe_accuracy(features[covered], cls[covered] % shapes),
    }
    if objects:
        report["object_shape"] = probe_accuracy(torch.stack(objects), torch.tensor(object_shape))
    return {k: round(v, 3) for k, v in report.items()}


def vit_features(vision_model: nn.Module, images: int, seed: int = 0):
    """Last hidden states and label maps of ``images`` rendered validation images."""
    from edje.training.data import to_uint8

    examples = list(synthetic.generate("val", seed, max_scenes=images, labels=True))
    pixels = to_uint8([e.image for e in examples]).float() / 127.5 - 1.0  # as PairData
    with torch.no_grad():
        hidden = vision_model.eval()(pixel_values=pixels).last_hidden_state
    return hidden, torch.from_numpy(np.stack([e.labels for e in examples]))


@torch.no_grad()
def encoded_val_pairs(source, keep, images: int, seed: int = 0, labels: bool = False):
    """``(ranking model, examples, image tokens [N, Q, D], the same rolled by one)``: the first
    ``images`` validation examples (one image per scene) that ``keep`` accepts, their images
    through the indexing model; the rolled tokens give every caption another scene's image."""
    indexing, _ = source.build_indexing_model()
    ranking, _ = source.build_ranking_model()
    generated = synthetic.generate("val", seed, images_per_scene=1, labels=labels)
    examples = [e for e in generated if keep(e)][:images]
    pixels = source.image_processor()(images=[e.image for e in examples], return_tensors="pt")
    tokens = indexing.eval().encode(pixels["pixel_values"]).compressed_tokens.float()
    return ranking.eval(), examples, tokens, torch.roll(tokens, 1, dims=0)


@torch.no_grad()
def joint_encoder_probes(source, images: int = 300, seed: int = 0) -> dict[str, dict]:
    """Masked-word accuracy per word group, own image vs another scene's (see module doc)."""
    from edje.training.data import word_group_ids

    ranking, examples, tokens, others = encoded_val_pairs(
        source, lambda e: e.kind != "plain", images, seed
    )
    tokenizer = source.tokenizer()
    enc = tokenizer([e.captions[0] for e in examples], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    group_of = word_group_ids(tokenizer, tuple(synthetic.WORD_GROUPS.values()))
    report = {}
    for g, name in enumerate(synthetic.WORD_GROUPS):
        hit = group_of[ids] == g
        rows = hit.any(1)
        if not rows.any():
            continue
        masked = torch.where(hit, torch.full_like(ids, tokenizer.mask_token_id), ids)[rows]
        report[name] = {"captions": int(rows.sum())}
        for label, image in (("own_image", tokens), ("other_image", others)):
            out = ranking.pair_hidden_states(image[rows], masked, mask[rows])
            hidden = out.last_hidden_state
            pred = ranking.language_model.cls(hidden[:, : ids.shape[1]]).argmax(-1)
            right = (pred == ids[rows])[hit[rows]]
            report[name][label] = round(float(right.float().mean()), 3)
    return report


def object_halves(
    examples: Sequence, tokenizer, maps: Sequence | None = None
) -> tuple[dict, list[int], list[int], list[int]]:
    """Tokenize each pair example's first caption; per token of a word that names an object,
    ``(row, column, half)``: 0 if that object's centre is in the left (top, for a vertical
    pair) half of its label map (of ``maps[row]``, an example of the same objects, if given),
    else 1. Returns ``(encoding, rows, columns, halves)``."""
    captions = [e.captions[0] for e in examples]
    enc = tokenizer(captions, padding=True, return_tensors="pt")
    rows, cols, half = [], [], []
    for row, (e, caption) in enumerate(zip(examples, captions, strict=True)):
        per_word = synthetic.phrase_classes(caption)
        labels = (maps or examples)[row].labels
        coord = np.indices(labels.shape)[0 if e.scene.axis == "v" else 1]  # y or x
        for t, w in enumerate(enc.word_ids(row)):
            where = labels == (per_word[w] if w is not None else 0)
            if w is not None and per_word[w] and where.any():
                rows.append(row)
                cols.append(t)
                half.append(int(coord[where].mean() >= e.labels.shape[0] / 2))
    return enc, rows, cols, half


def position_twins(examples: Sequence) -> list[int | None]:
    """Per example, the index of the example whose scene is its position-swapped twin (the
    same two objects, exchanged), or ``None`` if the list holds none."""
    at = {e.scene.key: i for i, e in enumerate(examples)}
    swapped = (synthetic.Scene(e.scene.kind, e.scene.objects[::-1], e.scene.axis) for e in examples)
    return [at.get(s.key) for s in swapped]


def where_probe(source, images: int = 400, seed: int = 0) -> dict[str, float]:
    """Object half (along the pair's axis) from its words' last hidden states (module doc)."""
    ranking, examples, tokens, others = encoded_val_pairs(
        source, lambda e: e.scene.kind == "pair", images, seed, labels=True
    )
    enc, rows, cols, half = object_halves(examples, source.tokenizer())
    report: dict[str, float] = {"words": len(rows)}

    def words_with(image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = ranking.pair_hidden_states(image, enc["input_ids"], enc["attention_mask"])
        return out.last_hidden_state[torch.tensor(rows), torch.tensor(cols)]

    own = words_with(tokens)
    for label, words in (("own_image", own), ("other_image", words_with(others))):
        report[label] = round(probe_accuracy(words, torch.tensor(half)), 3)
    # The probe fitted on own-image words, read with the position-swapped twin's image against
    # where the twin holds each object: 1.0 if words follow the image, 0.0 if word order.
    twins = [i if t is None else t for i, t in enumerate(position_twins(examples))]
    keep = torch.tensor([twins[r] != r for r in rows])
    if keep.any():
        maps = [examples[t] for t in twins]
        _, rows_t, cols_t, half_t = object_halves(examples, source.tokenizer(), maps)
        if (rows_t, cols_t) != (rows, cols):  # a twin that hides one of the caption's objects
            raise ValueError("a position twin's label map does not hold every named object")
        half_t = torch.tensor(half_t)
        twin = (words_with(tokens[torch.tensor(twins)])[keep], half_t[keep])
        report["twin_words"] = int(keep.sum())
        report["twin_image_follows_image"] = round(
            probe_accuracy(own[keep], torch.tensor(half)[keep], twin), 3
        )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edje.tools.probes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--stage1", help="a stage-1 SiglipModel state dict (weights only)")
    what.add_argument("--source", help="a model source directory (its ViT is probed)")
    parser.add_argument("--images", type=int, default=400, help="validation images (400)")
    args = parser.parse_args(argv)
    if args.stage1:
        from edje.training.first_stage import first_stage_config, new_first_stage
        from edje.training.recipe import Recipe

        recipe = Recipe()
        state = torch.load(args.stage1, weights_only=True)
        # Only the ViT is probed: the text tower's vocabulary size is read off the file.
        vocab = state["text_model.embeddings.token_embedding.weight"].shape[0]
        clip = new_first_stage(first_stage_config(recipe, vocab, 0))
        clip.load_state_dict(state)
        vision, patch = clip.vision_model, recipe.patch_size
    else:
        from edje.model_source import ModelSource

        source = ModelSource.from_dir(args.source)
        indexing, _ = source.build_indexing_model()
        vision = indexing.vision_encoder
        patch = vision.config.patch_size
    features, labels = vit_features(vision, args.images)
    report = {"vit": feature_probes(features, labels, patch)}
    if args.source:
        report["joint_encoder"] = joint_encoder_probes(source)
        report["where"] = where_probe(source)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
