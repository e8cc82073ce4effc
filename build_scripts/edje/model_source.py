"""A *model source*: where EDJE's configs, tokenizer and weights come from.

A source directory holds ``edje_config.json``::

    {"siglip_path": "siglip", "language_model_path": "language_model",
     "checkpoint": "edje.safetensors", "num_compressed_tokens": 64}

Paths are relative to the directory, absolute, or hub names (``google/siglip2-large-patch16-384``).
Models are built from the configs alone and then filled from the checkpoint through
:func:`edje.checkpoint.load_into`, so a real checkpoint and the embedded default take the same path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path

import torch
from transformers import AutoConfig, SiglipTextModel

from edje.checkpoint import LoadReport, load_into, read_state_dict
from edje.configuration import (
    ADAPTER_MLP_DIM,
    IMAGE_TOKEN,
    MAX_TEXT_TOKENS,
    PROJECTION_COMPRESSED,
    PUBLISHED_NUM_TOKENS,
    QUERY_TOKENS,
    EDJEConfig,
)
from edje.modeling import EDJEModelForIndexing, EDJEModelForRanking

CONFIG_NAME = "edje_config.json"


@dataclass
class ModelSource:
    """Everything needed to build both EDJE networks and their pre-processing."""

    siglip_path: str
    language_model_path: str
    checkpoint: str
    num_compressed_tokens: int = PUBLISHED_NUM_TOKENS
    projection_type: str = PROJECTION_COMPRESSED
    adapter_mlp_dim: int = ADAPTER_MLP_DIM
    max_text_tokens: int = MAX_TEXT_TOKENS
    description: str = ""
    random_weights: bool = False

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelSource:
        """Read ``edje_config.json`` and resolve its relative paths against ``path``."""
        path = Path(path)
        config_file = path / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} is not an EDJE model source: no {CONFIG_NAME}")
        raw = json.loads(config_file.read_text())
        for key in ("siglip_path", "language_model_path", "checkpoint"):
            local = path / raw[key]
            if local.exists():
                raw[key] = str(local)
        return cls(**raw)

    def save(self, path: str | Path) -> Path:
        """Write ``edje_config.json`` into ``path`` (paths are stored as given)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {f.name: getattr(self, f.name) for f in fields(self)}
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        return path

    def edje_config(self, indexing, ranking, text_tokenizer) -> EDJEConfig:
        """The shape contract of the models built from this source (see :mod:`configuration`)."""
        return EDJEConfig(
            num_compressed_tokens=ranking.num_compressed_tokens,
            token_width=ranking.language_model.config.hidden_size,
            embedding_dim=indexing.vision_encoder.config.hidden_size,
            image_size=indexing.image_size,
            max_text_tokens=self.max_text_tokens,
            query_tokens=min(text_tokenizer.model_max_length, QUERY_TOKENS),
            projection_type=self.projection_type,
            adapter_mlp_dim=self.adapter_mlp_dim,
            image_token_id=ranking.image_token_id,
        )

    @cached_property
    def model_id(self) -> str:
        """The model's identity: a hash of the checkpoint's bytes and of the token format.

        Collections record it, so tokens of two different models are never mixed.
        """
        digest = hashlib.sha256()
        with open(self.checkpoint, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(f"{self.projection_type}/{self.num_compressed_tokens}".encode())
        return "sha256:" + digest.hexdigest()[:16]

    @cached_property
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors, read once (weights only, never unpickled objects)."""
        return read_state_dict(self.checkpoint)

    def build_indexing_model(self) -> tuple[EDJEModelForIndexing, LoadReport]:
        """Indexing model from configs, weights from the checkpoint (strictly checked)."""
        model = EDJEModelForIndexing(
            self.siglip_path,
            self.language_model_path,
            self.num_compressed_tokens,
            projection_type=self.projection_type,
            adapter_mlp_dim=self.adapter_mlp_dim,
            load_pretrained=False,
        )
        report = load_into(model, self.state_dict)
        return model.eval(), report

    def build_ranking_model(self) -> tuple[EDJEModelForRanking, LoadReport]:
        """Ranking model from configs, weights from the checkpoint (strictly checked)."""
        model = EDJEModelForRanking(
            self.language_model_path, self.num_compressed_tokens, load_pretrained=False
        )
        report = load_into(model, self.state_dict)
        return model.eval(), report

    def build_text_model(self) -> tuple[SiglipTextModel, LoadReport | None]:
        """The first stage's text tower: ``clip.text_model.*`` from the checkpoint if present,
        else the SigLIP weights at ``siglip_path`` (report ``None``)."""
        prefix = "clip.text_model."
        if any(k.startswith(prefix) for k in self.state_dict):
            model = SiglipTextModel(AutoConfig.from_pretrained(self.siglip_path).text_config)
            sub = {k[len(prefix) :]: v for k, v in self.state_dict.items() if k.startswith(prefix)}
            return model.eval(), load_into(model, sub)
        return SiglipTextModel.from_pretrained(self.siglip_path).eval(), None

    def text_tokenizer(self):
        """The first stage's text tokenizer (SigLIP's, at ``siglip_path``)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.siglip_path)

    def tokenizer(self):
        """The MiniLM WordPiece tokenizer with ``<image>`` added as a special token."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.language_model_path)
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        return tok

    def image_processor(self):
        """The SigLIP image processor (PIL backend), the reference for the Triton preprocessor."""
        from transformers import SiglipImageProcessorPil

        return SiglipImageProcessorPil.from_pretrained(self.siglip_path)
