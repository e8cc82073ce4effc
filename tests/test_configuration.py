"""EDJEConfig: the shape contract, saved and loaded like any transformers config."""

from __future__ import annotations

import json

import pytest

from edje.configuration import EDJEConfig


def test_published_defaults_and_derived_lengths():
    config = EDJEConfig()
    assert config.token_shape == (64, 384) and config.embedding_dim == 1024
    assert config.pair_length == 128 and config.image_token_id == 30522
    assert EDJEConfig(num_compressed_tokens=576, max_text_tokens=64).pair_length == 640


def test_roundtrip_through_save_pretrained(tmp_path):
    config = EDJEConfig(num_compressed_tokens=16, token_width=256, embedding_dim=128)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "edje" and saved["num_compressed_tokens"] == 16
    loaded = EDJEConfig.from_pretrained(tmp_path)
    assert loaded.dims() == config.dims()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_compressed_tokens": 0}, "num_compressed_tokens must be a positive int"),
        ({"token_width": 3.5}, "token_width must be a positive int"),
        ({"projection_type": "pooled"}, "projection_type must be"),
    ],
)
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EDJEConfig(**kwargs)


def test_the_builder_writes_the_sources_contract(tiny_source, repo_dir):
    indexing, _ = tiny_source.build_indexing_model()
    ranking, _ = tiny_source.build_ranking_model()
    config = tiny_source.edje_config(indexing, ranking, tiny_source.text_tokenizer())
    manifest = json.loads((repo_dir / "edje_manifest.json").read_text())
    assert {k: manifest[k] for k in config.dims()} == config.dims()
    assert manifest["model_id"] == tiny_source.model_id
