"""Training data: image-caption pairs with groups, the synthetic world's splits, a Karpathy
dataset, the world's tokenizer, caption encodings and the frozen ViT's feature cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertTokenizerFast

from edje import synthetic
from edje.configuration import MAX_TEXT_TOKENS
from edje.tiny import make_vocab
from edje_client.evaluation import PLAIN_KIND, KarpathyDataset


@dataclass
class PairData:
    """Images and captions with groups: a caption matches exactly the images of its group.

    ``pixels`` is uint8 [N, 3, H, W] (or ``None`` when ``load_pixels`` reads on demand).
    """

    image_group: np.ndarray  # int [N]
    captions: list[str]
    caption_group: np.ndarray  # int [C]
    caption_kind: list[str]
    pixels: torch.Tensor | None = None
    load_pixels: Callable[[Sequence[int]], torch.Tensor] | None = None
    labels: torch.Tensor | None = None  # uint8 [N, H, W] object classes (synthetic world only)
    # int [N]: images whose scenes differ only in binding (swapped colours, flipped relation,
    # swapped counts) share a family (synthetic world only)
    image_family: np.ndarray | None = None
    # int [N, classes]: how many objects of each class (label-map value) each image holds
    # (synthetic world only)
    class_counts: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.images_of: dict[int, np.ndarray] = {}
        for g in np.unique(self.image_group):
            self.images_of[int(g)] = np.flatnonzero(self.image_group == g)
        # Per group, the images of its binding twins (same family, another group).
        self.twins_of: dict[int, np.ndarray] = {}
        if self.image_family is not None:
            for g, idx in self.images_of.items():
                family = self.image_family[idx[0]]
                twins = np.flatnonzero((self.image_family == family) & (self.image_group != g))
                if len(twins):
                    self.twins_of[g] = twins
        self.captions_of: dict[int, np.ndarray] = {}
        for g in np.unique(self.caption_group):
            self.captions_of[int(g)] = np.flatnonzero(self.caption_group == g)

    def pixel_values(self, idx: Sequence[int]) -> torch.Tensor:
        """Normalised pixels in [-1, 1] (SigLIP: scale 1/255, mean 0.5, std 0.5)."""
        if self.pixels is not None:
            return self.pixels[torch.as_tensor(np.asarray(idx))].float() / 127.5 - 1.0
        return self.load_pixels(idx)

    def relevant(self, captions: int | None = None) -> np.ndarray:
        """Bool [C, N]: which images each caption (the first ``captions``) describes."""
        return self.caption_group[:captions, None] == self.image_group[None, :]


def to_uint8(images: Sequence) -> torch.Tensor:
    """PIL images -> uint8 [N, 3, H, W]."""
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def world_data(
    split: str,
    seed: int,
    images_per_scene: int,
    all_templates: bool,
    tier: str | None = None,
) -> PairData:
    """A synthetic split: ``images_per_scene`` images per scene; captions are many of the
    training phrasings (training) or one random caption per image (evaluation, one image per
    scene, in evaluation ``tier``'s style and phrasing, :data:`edje.synthetic.TIERS`)."""
    if tier is None:
        examples = synthetic.generate(split, seed, images_per_scene=images_per_scene, labels=True)
    else:
        examples = synthetic.generate_tier(
            split, tier, seed, images_per_scene=images_per_scene, labels=True
        )
    examples = list(examples)
    keys = sorted({ex.scene.key for ex in examples})
    group_of = {k: i for i, k in enumerate(keys)}
    image_group = np.array([group_of[ex.scene.key] for ex in examples])
    families = {g: i for i, g in enumerate(sorted({ex.scene.group for ex in examples}))}
    captions, caption_group, kinds = [], [], []
    if all_templates:
        scenes = {ex.scene.key: ex.scene for ex in examples}
        for key in keys:
            for text in synthetic.all_captions(scenes[key]):
                captions.append(text)
                caption_group.append(group_of[key])
                kinds.append(scenes[key].caption_kind)
    else:
        for ex in examples:
            captions += ex.captions
            caption_group += [group_of[ex.scene.key]] * len(ex.captions)
            kinds += [ex.kind] * len(ex.captions)
    return PairData(
        image_group,
        captions,
        np.array(caption_group),
        kinds,
        to_uint8([e.image for e in examples]),
        labels=torch.from_numpy(np.stack([e.labels for e in examples])),
        image_family=np.array([families[ex.scene.group] for ex in examples]),
        class_counts=np.stack([synthetic.class_counts(ex.scene) for ex in examples]),
    )


def karpathy_data(
    path: str | Path, split: str, image_root: str | Path | None, processor
) -> PairData:
    """A Karpathy-format split (read by :class:`KarpathyDataset`); every image is its own group;
    untagged captions are ``plain``; pixels are read on demand through ``processor``."""
    from PIL import Image

    dataset = KarpathyDataset.load(path, split, image_root)

    def load(idx: Sequence[int]) -> torch.Tensor:
        images = [Image.open(dataset.images[i]).convert("RGB") for i in idx]
        return processor(images=images, return_tensors="pt")["pixel_values"]

    return PairData(
        np.arange(len(dataset.images)),
        dataset.captions,
        dataset.caption_image,
        [kind or PLAIN_KIND for kind in dataset.caption_kind],
        load_pixels=load,
    )


def world_tokenizer(max_length: int) -> BertTokenizerFast:
    """WordPiece over the world's words (plus characters, so any text tokenizes)."""
    return BertTokenizerFast(
        vocab=make_vocab(synthetic.vocabulary()), do_lower_case=True, model_max_length=max_length
    )


def encode_captions(tokenizer, texts: Sequence[str]):
    """Text-only tokenizations for the joint encoder, padded to the longest, at most
    ``MAX_TEXT_TOKENS`` (the shape contract's) long."""
    return tokenizer(
        list(texts), padding=True, truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
    )


def encode_edits(tokenizer, texts: Sequence[str], changed: Sequence[Sequence[int]]):
    """Edited captions ``(input_ids, attention_mask, labels)``; labels mark (1.0) the tokens of
    each caption's ``changed`` words."""
    enc = encode_captions(tokenizer, texts)
    labels = torch.zeros(enc["input_ids"].shape)
    for row, words in enumerate(changed):
        for t, w in enumerate(enc.word_ids(row)):
            if w is not None and w in words:
                labels[row, t] = 1.0
    return enc["input_ids"], enc["attention_mask"], labels


def word_group_ids(tokenizer, groups: Sequence[Sequence[str]]) -> torch.Tensor:
    """Per vocabulary id, the index of the word group it belongs to, or -1 (words the
    tokenizer does not know are left out)."""
    group_of = torch.full((len(tokenizer),), -1, dtype=torch.long)
    for g, words in enumerate(groups):
        ids = tokenizer.convert_tokens_to_ids(list(words))
        group_of[[i for i in ids if i != tokenizer.unk_token_id]] = g
    return group_of


def patch_object_mix(labels: torch.Tensor, patch: int) -> torch.Tensor:
    """Per-patch share of each object class: uint8 ``[B, H, W]`` -> ``[B, P, C]`` (rows sum 1)."""
    one_hot = F.one_hot(labels.long(), synthetic.NUM_OBJECT_CLASSES).permute(0, 3, 1, 2).float()
    return F.avg_pool2d(one_hot, patch).flatten(2).transpose(1, 2)


class Features:
    """Frozen ViT patch features: cached once (``cache=True``) or computed per batch."""

    def __init__(self, vision_encoder: nn.Module, data: PairData, cache: bool, device) -> None:
        self.vision_encoder, self.data, self.device = vision_encoder.eval(), data, device
        self.cached = None
        if cache:
            feats = []
            with torch.no_grad():
                for start in range(0, len(data.image_group), 256):
                    idx = range(start, min(start + 256, len(data.image_group)))
                    out = vision_encoder(pixel_values=data.pixel_values(idx).to(device))
                    feats.append(out.last_hidden_state.half().cpu())
            self.cached = torch.cat(feats)

    @torch.no_grad()
    def __call__(self, idx: Sequence[int]) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[torch.as_tensor(np.asarray(idx))].to(self.device).float()
        pixels = self.data.pixel_values(idx).to(self.device)
        return self.vision_encoder(pixel_values=pixels).last_hidden_state.float()
