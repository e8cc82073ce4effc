"""EDJE's PyTorch models against an independent reference, and checkpoint loading."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, BertConfig

from edje.checkpoint import CheckpointError, load_into, read_state_dict
from edje.model_source import ModelSource
from edje.modeling import EDJEModelForIndexing, EDJEModelForRanking, build_pair_layout
from tests.research_reference import (
    ResearchEDJE,
    reference_pair_rows,
    reference_scores,
    reference_tokens,
)

Q = 16
MLP = 96
TEXTS = ["a red circle left of a blue square", "dog", "", "the cat sleeping on a sofa " * 3]


@pytest.fixture(scope="module")
def configs(tiny_source: ModelSource):
    siglip = AutoConfig.from_pretrained(tiny_source.siglip_path)
    language = BertConfig.from_pretrained(tiny_source.language_model_path)
    return siglip, language


@pytest.fixture(scope="module")
def research(configs, tmp_path_factory: pytest.TempPathFactory):
    """A research-layout checkpoint file with random weights, and its state dict."""
    torch.manual_seed(1)
    module = ResearchEDJE(*configs, q=Q, mlp=MLP).eval()
    path = tmp_path_factory.mktemp("research") / "pytorch_model.pth"
    torch.save({"model": module.research_state_dict(), "epoch": 3}, path)
    return path, module


def _source(tiny_source: ModelSource, checkpoint: Path, **kw) -> ModelSource:
    return ModelSource(
        siglip_path=tiny_source.siglip_path,
        language_model_path=tiny_source.language_model_path,
        checkpoint=str(checkpoint),
        num_compressed_tokens=Q,
        adapter_mlp_dim=MLP,
        **kw,
    )


def _texts(tiny_source: ModelSource, texts: list[str] = TEXTS) -> dict[str, torch.Tensor]:
    tok = tiny_source.tokenizer()
    return tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")


def test_research_checkpoint_matches_reference_forward(tiny_source, research, configs):
    path, module = research
    source = _source(tiny_source, path)
    indexing, index_report = source.build_indexing_model()
    ranking, rank_report = source.build_ranking_model()
    sd = {k: v.detach() for k, v in module.research_state_dict().items()}

    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = indexing.encode(pixels)
        vit = module.vision_encoder(pixel_values=pixels)
        v = configs[0].vision_config
        ref_tokens = reference_tokens(
            sd, vit.last_hidden_state, v.num_attention_heads, v.layer_norm_eps
        )
    assert ours.compressed_tokens.shape == (3, Q, 384)
    torch.testing.assert_close(ours.compressed_tokens, ref_tokens, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.image_embedding, F.normalize(vit.pooler_output, dim=-1))

    batch = _texts(tiny_source)
    tokens = torch.randn(len(TEXTS), Q, 384)
    with torch.no_grad():
        scores = ranking(tokens, batch["input_ids"], batch["attention_mask"])
        ref = reference_scores(sd, configs[1], tokens, batch["input_ids"], batch["attention_mask"])
    assert scores.shape == (len(TEXTS),)
    torch.testing.assert_close(scores, ref, atol=1e-4, rtol=1e-4)
    assert scores.std() > 1e-3  # the pairs really differ: a constant output would pass nothing

    # Every key is accounted for: training-only parts are reported as ignored.
    assert {k.split(".")[0] for k in rank_report.ignored} >= {"clip", "text_projection"}
    assert not any(k.startswith("vision_") for k in rank_report.used)
    assert all(k.startswith("vision_") for k in index_report.used)


def test_seed_style_strict_false_load_gives_the_same_results(tiny_source, research):
    """The seed's ``load_state_dict(..., strict=False)`` loads every weight, nested ViT too."""
    path, _ = research
    indexing, _ = _source(tiny_source, path).build_indexing_model()
    seed_indexing = EDJEModelForIndexing(
        tiny_source.siglip_path,
        tiny_source.language_model_path,
        Q,
        adapter_mlp_dim=MLP,
        load_pretrained=False,
    )
    result = seed_indexing.load_state_dict(torch.load(path)["model"], strict=False)
    assert not result.missing_keys
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(seed_indexing.eval()(pixels), indexing(pixels))

    ranking, _ = _source(tiny_source, path).build_ranking_model()
    seed_style = EDJEModelForRanking(tiny_source.language_model_path, Q, load_pretrained=False)
    seed_style.load_state_dict(torch.load(path, map_location="cpu")["model"], strict=False)
    seed_style.eval()
    batch = _texts(tiny_source)
    tokens = torch.randn(len(TEXTS), Q, 384)
    with torch.no_grad():
        a = ranking(tokens, batch["input_ids"], batch["attention_mask"])
        b = seed_style(tokens, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(a, b)


def test_pair_layout_matches_the_per_row_reference(tiny_source):
    batch = _texts(tiny_source)
    image_id = tiny_source.tokenizer().convert_tokens_to_ids("<image>")
    ids, mask, types = build_pair_layout(batch["input_ids"], batch["attention_mask"], Q, image_id)
    rows = reference_pair_rows(batch["input_ids"], batch["attention_mask"], Q, image_id)
    for row, (ref_ids, ref_types) in enumerate(rows):
        n = len(ref_ids)
        assert ids[row, :n].tolist() == ref_ids
        assert types[row, :n].tolist() == ref_types
        assert mask[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert ids[row, n:].eq(0).all()

    # The Triton tokenizer's layout comes from the HF tokenizer's pair encoding: same rows.
    tok = tiny_source.tokenizer()
    pair = tok(TEXTS, ["<image>" * Q] * len(TEXTS), padding="longest", return_tensors="pt")
    assert torch.equal(pair["input_ids"], ids[:, : pair["input_ids"].shape[1]])
    assert torch.equal(pair["token_type_ids"], types[:, : pair["input_ids"].shape[1]])


def test_missing_key_is_named(tiny_source, research, tmp_path):
    path, module = research
    sd = module.research_state_dict()
    del sd["vision_projection.key.weight"]
    bad = tmp_path / "bad.pth"
    torch.save({"model": sd}, bad)
    with pytest.raises(CheckpointError, match=r"vision_projection\.key\.weight"):
        _source(tiny_source, bad).build_indexing_model()
    # The ranking model does not need that key, so it still loads.
    _source(tiny_source, bad).build_ranking_model()


def test_shape_mismatch_is_named(tiny_source, research, tmp_path):
    path, _ = research
    with pytest.raises(
        CheckpointError, match=r"size mismatch for vision_projection\.query.*\[1, 16, 64\]"
    ):
        ModelSource(
            siglip_path=tiny_source.siglip_path,
            language_model_path=tiny_source.language_model_path,
            checkpoint=str(path),
            num_compressed_tokens=8,
            adapter_mlp_dim=MLP,
        ).build_indexing_model()


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_checkpoint_never_unpickles_objects(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"model": {"w": torch.zeros(1)}, "x": _Payload()}, fh)
    with pytest.raises(CheckpointError, match="weights-only"):
        read_state_dict(path)
    assert "unpickled!" not in capsys.readouterr().out


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.safetensors")


def test_local_variant_is_configuration(configs, tmp_path):
    """The "Local" variant: per-token MLP over all patches, position table grown."""
    siglip, language = configs
    language = BertConfig(**{**language.to_dict(), "max_position_embeddings": 64})
    patches = (siglip.vision_config.image_size // siglip.vision_config.patch_size) ** 2
    torch.manual_seed(2)
    module = ResearchEDJE(siglip, language, q=patches, mlp=MLP, local=True)
    indexing = EDJEModelForIndexing(
        vision_config=siglip.vision_config,
        language_config=language,
        num_compressed_tokens=patches,
        projection_type="local",
    )
    ranking = EDJEModelForRanking(language_config=language, num_compressed_tokens=patches)
    emb = ranking.language_model.bert.embeddings.position_embeddings.weight
    assert emb.shape[0] == 64 + patches
    torch.testing.assert_close(emb[-1], emb[63])  # new rows copy the last trained row
    # The research module's own table is 64 rows: grow it the way the research code does.
    module.language_model.bert.embeddings.position_embeddings = (
        ranking.language_model.bert.embeddings.position_embeddings
    )
    sd = module.research_state_dict()
    load_into(indexing, sd)
    load_into(ranking, sd)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = module.vision_encoder(pixel_values=pixels).last_hidden_state
        ref = module.vision_projection(hidden)
        tokens = indexing(pixels)
    assert tokens.shape == (2, patches, language.hidden_size)
    torch.testing.assert_close(tokens, ref)


def test_seed_usage_snippet_runs_with_local_paths(tiny_source, research, tmp_path):
    """The model card's snippet, unchanged apart from the import, paths and the image source."""
    from transformers import BertModel, SiglipModel

    siglip_dir, lm_dir = tmp_path / "siglip", tmp_path / "minilm"
    SiglipModel(AutoConfig.from_pretrained(tiny_source.siglip_path)).save_pretrained(siglip_dir)
    # The hub repo also holds SigLIP's Gemma tokenizer; locally the processor gets its own dir.
    processor_dir = tmp_path / "siglip_processor"
    tiny_source.image_processor().save_pretrained(processor_dir)
    BertModel(BertConfig.from_pretrained(tiny_source.language_model_path)).save_pretrained(lm_dir)
    from transformers import AutoTokenizer as _T

    _T.from_pretrained(tiny_source.language_model_path).save_pretrained(lm_dir)
    checkpoint_path, module = research
    from PIL import Image

    # ---- the seed's snippet (num_compressed_tokens=Q for the tiny checkpoint) ----
    from transformers import AutoProcessor, AutoTokenizer

    from edje.modeling import EDJEModelForIndexing, EDJEModelForRanking

    checkpoint = torch.load(checkpoint_path, map_location="cpu")
    indexing_model = EDJEModelForIndexing(
        siglip_path=str(siglip_dir),
        language_model_path=str(lm_dir),
        num_compressed_tokens=Q,
        adapter_mlp_dim=MLP,
    )
    ranking_model = EDJEModelForRanking(language_model_path=str(lm_dir), num_compressed_tokens=Q)
    indexing_model.load_state_dict(checkpoint["model"], strict=False)
    ranking_model.load_state_dict(checkpoint["model"], strict=False)
    indexing_model.eval()
    ranking_model.eval()
    image = Image.new("RGB", (40, 30), (200, 30, 30)).convert("RGB")
    processor = AutoProcessor.from_pretrained(str(processor_dir), use_fast=True)
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        compressed_tokens = indexing_model(pixel_values)
    candidate_captions = [
        "a cute golden retriever puppy",
        "a cat sleeping on a sofa",
        "a beautiful sunset over the ocean",
    ]
    tokenizer = AutoTokenizer.from_pretrained(str(lm_dir))
    text_inputs = tokenizer(
        candidate_captions, padding=True, truncation=True, max_length=64, return_tensors="pt"
    )
    compressed_tokens_batch = compressed_tokens.expand(len(candidate_captions), -1, -1)
    with torch.no_grad():
        scores = ranking_model(
            compressed_tokens=compressed_tokens_batch,
            input_ids=text_inputs["input_ids"],
            attention_mask=text_inputs["attention_mask"],
        )
    ranked = sorted(zip(candidate_captions, scores.tolist(), strict=True), key=lambda x: x[1])
    # ---- end of snippet ----
    assert compressed_tokens.shape == (1, Q, 384)
    assert len(ranked) == 3 and all(isinstance(s, float) for _, s in ranked)
    sd = {k: v.detach() for k, v in module.research_state_dict().items()}
    ref = reference_scores(
        sd,
        BertConfig.from_pretrained(tiny_source.language_model_path),
        compressed_tokens_batch,
        text_inputs["input_ids"],
        text_inputs["attention_mask"],
    )
    torch.testing.assert_close(scores, ref, atol=1e-4, rtol=1e-4)
