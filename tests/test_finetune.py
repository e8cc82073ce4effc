"""Fine-tuning a model source (``python -m edje.train finetune``) and writing its weights."""

from __future__ import annotations

import torch

from edje import synthetic
from edje.checkpoint import read_state_dict, write_updated_source
from edje.model_source import ModelSource
from edje.tiny import TinySpec, make_tiny_source
from edje.train import main

SMALL = TinySpec(num_compressed_tokens=4, language_width=64, language_heads=2)


def test_finetune_writes_a_source_with_new_weights(tmp_path):
    make_tiny_source(tmp_path / "source", SMALL, seed=0)
    synthetic.write_karpathy(tmp_path / "data", "train", max_scenes=24)
    out = tmp_path / "tuned"
    args = ["finetune", "--source", str(tmp_path / "source"), "--data"]
    args += [str(tmp_path / "data" / "dataset.json"), "--out", str(out), "--device", "cpu"]
    assert main([*args, "--steps", "6", "--batch-size", "8", "--warmup", "1", "--lr", "1e-3"]) == 0
    before = read_state_dict(tmp_path / "source" / "edje.safetensors")
    after = read_state_dict(out / "edje.safetensors")
    assert set(after) >= set(before)
    assert {after[k].dtype for k in before} == {before[k].dtype for k in before}
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert {"language_model", "classification_head"} <= changed, changed
    assert "text_projection.weight" in after  # trained from scratch: the source had none
    ranking, _ = ModelSource.from_dir(out).build_ranking_model()  # loads, every key accounted
    assert ranking.num_compressed_tokens == SMALL.num_compressed_tokens


def test_updated_weights_keep_a_torch_checkpoints_format_and_dtype(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text("{}")
    torch.save(
        {"model": {"a": torch.zeros(2, dtype=torch.float16), "b": torch.ones(1)}}, source / "w.pt"
    )
    path = write_updated_source(source, tmp_path / "out", source / "w.pt", {"a": torch.ones(2)})
    assert path == tmp_path / "out" / "w.pt" and (tmp_path / "out" / "config.json").is_file()
    state = torch.load(path, weights_only=True)["model"]
    assert state["a"].dtype == torch.float16 and torch.equal(state["a"], torch.ones(2).half())
    assert state["b"].dtype == torch.float32 and torch.equal(state["b"], torch.ones(1))
