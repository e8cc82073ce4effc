"""The recipe: every size, schedule and loss weight the trained default depends on."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch


@dataclass
class Recipe:
    """Sizes and schedule of the embedded default (every number the result depends on)."""

    seed: int = 0
    # World
    image_size: int = 64
    images_per_scene: int = 4
    # First stage (SiglipModel)
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    text_width: int = 128
    text_layers: int = 2
    text_len: int = 32  # the first stage's text length (wordpieces, padded)
    stage1_steps: int = 800
    stage1_batch: int = 128
    stage1_lr: float = 1e-3
    # Auxiliary loss: predict each patch's grid position from the ViT's last hidden state, so
    # the frozen patch tokens keep *where* things are (the adapter needs it for relations).
    stage1_position_weight: float = 0.2
    # Auxiliary loss: each patch's mix of objects (colour x shape, from the renderer's label map).
    # The tiny ViT stands in for a web-scale SigLIP, which sees shapes. Linear probe of an
    # object's shape (3-way) from its mean patch feature (python -m edje.tools.probes): 45% with the
    # sigmoid loss alone, 49% at weight 1, 88% at weight 5; colour is 100% throughout.
    stage1_object_weight: float = 5.0
    # EDJE
    num_compressed_tokens: int = 16
    adapter_mlp_dim: int = 512
    # "minilm": the joint encoder starts from the first lm_layers layers of the packaged
    # all-MiniLM-L6-v2 (width 384, 12 heads, FFN 1536: the sizes below must be its own);
    # "none": from scratch, at the sizes below.
    language_prior: str = "minilm"
    # "minilm": both towers read MiniLM's uncased WordPiece vocabulary (30,522 entries, as the
    # published model); "world": a small WordPiece vocabulary of the world's own words.
    vocabulary: str = "minilm"
    lm_width: int = 384
    lm_layers: int = 4
    lm_heads: int = 12
    lm_intermediate: int = 1536
    lm_dropout: float = 0.0
    stage2: StageTwo = field(default_factory=lambda: StageTwo())


@dataclass
class StageTwo:
    """EDJE training schedule and loss weights."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 100
    weight_decay: float = 0.01
    hard_k: int = 128  # hard negatives are drawn from the first stage's top-k ...
    hard_k_min: int = 8  # ... with k shrinking geometrically to this
    hard_k_decay: float = 0.7  # over this fraction of the steps
    curriculum: float = 0.3  # fraction of steps over which the hard share goes 0 -> max
    max_hard_share: float = 0.8
    itm_weight: float = 1.0
    rank_weight: float = 1.0
    itc_weight: float = 0.5
    mlm_weight: float = 1.0
    mlm_with_image: bool = True
    mlm_probability: float = 0.25
    distill_weight: float = 0.0
    # World captions only: per positive, a minimally edited caption (edje.synthetic.edit_caption)
    # as an ITM negative, and a per-word head that must find the edited words.
    edit_negatives: bool = True
    rtd_weight: float = 1.0
    distill_temperature: float = 0.1
    distill_until: float = 1.0  # the distillation weight falls linearly to 0 by this progress
    image_negatives: int = 1  # wrong images per positive caption (mined or random)
    # Share of those drawn from the caption's binding twins (synthetic world: its scene with
    # colours swapped, the relation flipped or counts swapped), the re-ranker's hardest case;
    # 0 before progress ``twin_from`` (from the start they stall early learning), then rising
    # with the hard share.
    twin_share: float = 0.3
    twin_from: float = 0.45
    image_token_scale: float = 2.0  # > 0: start image tokens this many times the word std
    ground_weight: float = 1.0  # grounding loss on attention (synthetic world; 0: off)
    ground_heads: int = 2  # ... on the first this many heads ...
    ground_layers: int = 2  # ... of the first this many layers
    ground_relations: bool = False  # relation words too: each looks at the object it points at
    ground_relations_from: float = 0.0  # ... from this progress on (from the start they slow it)
    # Each grounded phrase word's last hidden state predicts where its object is (the centre
    # of its grounding target over the image cells) through a training-only linear head, so
    # words carry their object's position for relations to compare (synthetic world; 0: off).
    where_weight: float = 1.0
    # ... also on each caption's wrong images, with the targets from that image wherever it
    # holds the caption's objects (binding twins: the same objects elsewhere), so that position
    # has to come from the image, not from the caption's word order.
    where_on_negatives: bool = True
    # Each phrase word of a count caption says, through a training-only head on its last hidden
    # state, how many objects of its class the image holds (0..4), with the caption's own image
    # and with its wrong ones (count twins: the same objects in other numbers), so that numbers
    # are read from the image (synthetic world; 0: off).
    count_weight: float = 0.0
    freeze_word_embeddings: bool = True  # with the MiniLM prior: its word table stays fixed
    # With a language prior: the learning rate of its pretrained embeddings and layers, as a
    # share of ``lr`` (the adapter and every head keep ``lr``), so that fine-tuning keeps more
    # of what the prior knows about sentences.
    prior_lr_scale: float = 1.0
    log_every: int = 20
    eval_every: int = 400
    eval_queries: int = 0  # 0: the whole validation split
    grad_clip: float = 5.0
    time_budget: float = 0.0  # seconds; if set, the schedule runs on wall time (steps = max)
    warm_start_adapter: float = 0.5  # query noise when starting from the pooling head (0: off)
    adapter_init: str = "spatial"  # "spatial" (a grid of windows), "head" (pooling head), "random"


def with_overrides(recipe: Recipe, overrides: dict) -> Recipe:
    """``recipe`` with fields replaced from ``overrides``; its ``"stage2"`` entry, a dict,
    replaces :class:`StageTwo` fields."""
    overrides = dict(overrides)
    stage2 = overrides.pop("stage2", {})
    out = Recipe(**(asdict(recipe) | overrides | {"stage2": recipe.stage2}))
    out.stage2 = StageTwo(**(asdict(recipe.stage2) | stage2))
    return out


def set_seed(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
