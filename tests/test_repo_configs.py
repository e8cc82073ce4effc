"""Every generated config.pbtxt parses against Triton's ModelConfig protobuf, for both runtimes."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from edje.build_repo import RepoSettings, build_repository, fill_template, main

MODELS = (
    "edje_index",
    "edje_preprocess",
    "edje_rank",
    "edje_ranker",
    "edje_text_embed",
    "edje_text_encoder",
    "edje_text_tokenizer",
    "edje_tokenizer",
    "edje_vision_adapter",
)
ONNX = ("edje_ranker", "edje_text_encoder", "edje_vision_adapter")


def _parse(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def gpu_repo(tiny_source, tmp_path_factory):
    settings = RepoSettings(runtime="onnxruntime", gpu=True, tensorrt=True)
    return build_repository(tiny_source, tmp_path_factory.mktemp("gpu") / "repo", settings)


def test_python_runtime_configs(repo_dir):
    assert sorted(p.name for p in repo_dir.iterdir() if p.is_dir()) == sorted(MODELS)
    configs = {name: _parse(repo_dir / name / "config.pbtxt") for name in MODELS}
    for name, config in configs.items():
        assert config.name == name
        if config.platform != "ensemble":
            assert config.backend == "python"
            assert config.HasField("dynamic_batching"), name
            assert (repo_dir / name / "1" / "model.py").is_file()
    ranker = configs["edje_ranker"]
    assert [i.name for i in ranker.input] == [
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "compressed_tokens",
    ]
    assert list(ranker.input[3].dims) == [64, 384] and ranker.max_batch_size == 256
    assert list(configs["edje_index"].output[0].dims) == [64, 384]


def test_onnxruntime_gpu_configs(gpu_repo):
    for name in MODELS:
        config = _parse(gpu_repo / name / "config.pbtxt")
        if name in ONNX:
            assert config.backend == "onnxruntime" and config.default_model_filename == "model.onnx"
            assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
            (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
            assert accelerator.name == "tensorrt"
            assert accelerator.parameters["precision_mode"] == "FP16"
            assert not (gpu_repo / name / "1" / "model.py").exists()
            assert (gpu_repo / name / "1" / "model.onnx").is_file()


def test_unfilled_placeholder_is_an_error(tmp_path):
    template = tmp_path / "config.pbtxt"
    template.write_text('name: "x"\nmax_batch_size: ${nope}\n')
    with pytest.raises(KeyError, match=r"\$\{nope\}"):
        fill_template(template, {})


def test_bad_settings_are_refused(capsys):
    assert main(["--runtime", "python", "--gpu", "--output", "/nonexistent/x"]) == 2
    assert "--gpu/--tensorrt need --runtime onnxruntime" in capsys.readouterr().err


def test_help_explains_the_sources(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--checkpoint" in out and "--runtime" in out and "Examples" in out
