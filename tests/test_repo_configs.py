"""Every generated config.pbtxt parses against Triton's ModelConfig protobuf, for both runtimes;
every model folder shows the code it runs, and the builder copies it by one rule."""

from __future__ import annotations

import ast

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from edje.build_repo import (
    SHARED_DIR,
    TEMPLATE_DIR,
    RepoSettings,
    build_repository,
    fill_template,
    main,
)

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
            assert _python_files(gpu_repo / name) == [], name  # no Python for Triton's ORT
        elif config.backend == "python":
            assert (gpu_repo / name / "1" / "model.py").is_file(), name


def _python_files(folder) -> list[str]:
    return sorted(p.name for p in (folder / "1").glob("*.py"))


def test_every_model_folder_shows_the_code_it_runs(repo_dir):
    helpers = sorted(p.name for p in (TEMPLATE_DIR / SHARED_DIR).glob("*.py"))
    for name in MODELS:
        template, built = TEMPLATE_DIR / name, repo_dir / name
        if _parse(built / "config.pbtxt").platform == "ensemble":
            assert _python_files(template) == _python_files(built) == [], name
            continue
        # The committed model.py is what runs, byte for byte, with every helper beside it.
        code = (template / "1" / "model.py").read_text()
        assert (built / "1" / "model.py").read_text() == code, name
        assert _python_files(built) == sorted({"model.py", *helpers}), name
    for helper in helpers:
        copy = repo_dir / "edje_ranker" / "1" / helper
        assert copy.read_text() == (TEMPLATE_DIR / SHARED_DIR / helper).read_text()
    # The text tokenizer runs its own code, not a copy of edje_tokenizer's.
    text = (TEMPLATE_DIR / "edje_text_tokenizer" / "1" / "model.py").read_text()
    assert text != (TEMPLATE_DIR / "edje_tokenizer" / "1" / "model.py").read_text()


def _imports_and_calls(path) -> tuple[set[str], set[str], set[str]]:
    """(top-level modules imported, names called, classes defined) in one Python file."""
    nodes = list(ast.walk(ast.parse(path.read_text())))
    names = {a.name for n in nodes if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.module}
    calls = {n.func.id for n in nodes if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    classes = {n.name for n in nodes if isinstance(n, ast.ClassDef)}
    return {name.partition(".")[0] for name in names}, calls, classes


def test_python_models_share_one_execute_and_never_import_the_client():
    code = sorted(TEMPLATE_DIR.glob("*/1/*.py")) + sorted(TEMPLATE_DIR.glob(f"{SHARED_DIR}/*.py"))
    models = 0
    for path in code:
        imports, calls, classes = _imports_and_calls(path)
        assert "edje_client" not in imports, path
        if "TritonPythonModel" in classes:  # every model answers through one BatchExecutor
            assert {"BatchExecutor", "Parameters", "model_config"} <= calls, path
            models += 1
    assert models == 5  # preprocess, tokenizer, text tokenizer, token bank, the ONNX runner


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
