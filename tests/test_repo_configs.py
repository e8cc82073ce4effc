"""Every generated config.pbtxt parses against Triton's ModelConfig protobuf, for both runtimes;
every model folder shows the code it runs, and the builder copies it by one rule. GPU
repositories carry TensorRT caches, optimization profiles and warmups that agree with each
model's inputs and batch sizes."""

from __future__ import annotations

import ast
import json
from pathlib import PurePosixPath

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from edje.build_repo import (
    DEFAULT_TRT_CACHE_PATH,
    INT_OPTIONS,
    MANIFEST,
    SHARED_DIR,
    TEMPLATE_DIR,
    RepoSettings,
    build_repository,
    fill_template,
    gpu_config_lines,
    gpu_models,
    main,
    parse_args,
    template_values,
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
SERVING_RECORD = TEMPLATE_DIR.parent / "docs" / "serving.json"  # the sweep behind the defaults
# The TensorRT accelerator parameters Triton's onnxruntime backend accepts (src/onnxruntime.cc of
# triton-inference-server/onnxruntime_backend; its README's mapping table). It refuses any other
# key, and the model then fails to load.
BACKEND_TRT_KEYS = frozenset(
    {
        "precision_mode",
        "max_workspace_size_bytes",
        "trt_max_partition_iterations",
        "trt_min_subgraph_size",
        "int8_calibration_table_name",
        "int8_use_native_calibration_table",
        "trt_dla_enable",
        "trt_dla_core",
        "trt_engine_cache_enable",
        "trt_engine_cache_path",
        "trt_engine_cache_prefix",
        "trt_dump_subgraphs",
        "trt_force_sequential_engine_build",
        "trt_context_memory_sharing_enable",
        "trt_layer_norm_fp32_fallback",
        "trt_timing_cache_enable",
        "trt_timing_cache_path",
        "trt_force_timing_cache",
        "trt_detailed_build_log",
        "trt_build_heuristics_enable",
        "trt_sparsity_enable",
        "trt_builder_optimization_level",
        "trt_auxiliary_streams",
        "trt_tactic_sources",
        "trt_extra_plugin_lib_paths",
        "trt_profile_min_shapes",
        "trt_profile_max_shapes",
        "trt_profile_opt_shapes",
        "trt_cuda_graph_enable",
        "trt_dump_ep_context_model",
        "trt_ep_context_file_path",
        "trt_ep_context_embed_mode",
    }
)


def _parse(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def gpu_repo(tiny_source, tmp_path_factory):
    settings = RepoSettings(runtime="onnxruntime", gpu=True, tensorrt=True)
    return build_repository(tiny_source, tmp_path_factory.mktemp("gpu") / "repo", settings)


@pytest.fixture(scope="module")
def cuda_repo(tiny_source, tmp_path_factory):
    """``--gpu`` without ``--tensorrt``: ONNX Runtime's CUDA provider."""
    settings = RepoSettings(runtime="onnxruntime", gpu=True)
    return build_repository(tiny_source, tmp_path_factory.mktemp("cuda") / "repo", settings)


def test_python_runtime_configs(repo_dir):
    assert sorted(p.name for p in repo_dir.iterdir() if p.is_dir()) == sorted(MODELS)
    configs = {name: _parse(repo_dir / name / "config.pbtxt") for name in MODELS}
    for name, config in configs.items():
        assert config.name == name
        # The CPU repository has no GPU lines: no accelerator, no warmup.
        assert not config.HasField("optimization") and not config.model_warmup, name
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
    # conftest builds with rank_queue_delay_us=20000: the tokenizer keeps its own default, 0.
    assert ranker.dynamic_batching.max_queue_delay_microseconds == 20_000
    assert configs["edje_tokenizer"].dynamic_batching.max_queue_delay_microseconds == 0
    assert [g.count for g in ranker.instance_group] == [2]
    for name in ONNX:
        parameters = {k: v.string_value for k, v in configs[name].parameters.items()}
        assert parameters["intra_op_thread_count"] == "1", name
        assert parameters["allow_spinning"] == "1", name


def test_serving_defaults_are_the_sweeps_choice():
    """RepoSettings(), and so edje-build-repo without flags, ships what docs/serving.json's
    sweep chose; the tokenizer waits for no batch and ORT keeps its own spin-waiting."""
    defaults, args = RepoSettings(), parse_args([])
    expected = {
        "rank_queue_delay_us": 200,
        "ranker_instances": 2,
        "intra_op_threads": 1,
        "tokenizer_queue_delay_us": 0,
        "allow_spinning": 1,
    }
    assert {k: getattr(defaults, k) for k in expected} == expected
    assert {k: getattr(args, k) for k in expected} == expected
    choice = json.loads(SERVING_RECORD.read_text())["defaults"]["choice"]
    shipped = {k: getattr(defaults, k) for k in choice}
    assert shipped == choice, f"{SERVING_RECORD} chose {choice}; RepoSettings ships {shipped}"


def test_flags_reach_the_configs(tiny_source, tiny_models):
    """The tokenizer's delay is its own flag; --allow-spinning and the ranker's settings land
    in the configs the builder fills."""
    flags = {"rank-queue-delay-us": 300, "tokenizer-queue-delay-us": 700, "ranker-instances": 3}
    flags |= {"intra-op-threads": 2, "allow-spinning": 0}
    args = parse_args([word for k, v in flags.items() for word in (f"--{k}", str(v))])
    settings = RepoSettings(**{name: getattr(args, name) for name in INT_OPTIONS})
    indexing, ranking = tiny_models
    tokenizer, text_tokenizer = tiny_source.tokenizer(), tiny_source.text_tokenizer()
    dims = tiny_source.edje_config(indexing, ranking, text_tokenizer).dims()
    values = template_values(tiny_source, settings, dims, tokenizer, text_tokenizer)

    def config(name: str) -> model_config_pb2.ModelConfig:
        text = fill_template(TEMPLATE_DIR / name / "config.pbtxt", values)
        return text_format.Parse(text, model_config_pb2.ModelConfig())

    ranker = config("edje_ranker")
    assert ranker.dynamic_batching.max_queue_delay_microseconds == 300
    assert config("edje_tokenizer").dynamic_batching.max_queue_delay_microseconds == 700
    assert [g.count for g in ranker.instance_group] == [3]
    for name in ONNX:
        parameters = {k: v.string_value for k, v in config(name).parameters.items()}
        assert (parameters["intra_op_thread_count"], parameters["allow_spinning"]) == ("2", "0")


def test_allow_spinning_takes_0_or_1(tmp_path, capsys):
    assert main(["--allow-spinning", "2", "--output", str(tmp_path / "r")]) == 2
    assert "--allow-spinning takes 0 or 1, got 2" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


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


def _accelerator(config) -> dict[str, str]:
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    return dict(accelerator.parameters)


def _shapes(value: str) -> dict[str, list[int]]:
    """``name:BxD1,name2:BxD1xD2`` -> ``{name: [B, D1], ...}`` (ONNX Runtime's profile format)."""
    shapes = {}
    for item in value.split(","):
        name, _, dims = item.partition(":")
        assert name not in shapes, value
        shapes[name] = [int(d) for d in dims.split("x")]
    return shapes


def _check_warmup(config) -> None:
    """A sample at batch 1 and one at max_batch_size, each naming every input with the config's
    data type and dims; ids zeros (random bytes would be ids outside the vocabulary)."""
    inputs = {i.name: i for i in config.input}
    samples = {w.batch_size: w for w in config.model_warmup}
    assert {1, config.max_batch_size} <= set(samples), config.name
    for sample in config.model_warmup:
        assert sample.name and sample.count >= 1 and 1 <= sample.batch_size <= config.max_batch_size
        assert set(sample.inputs) == set(inputs), (config.name, sample.name)
        for name, data in sample.inputs.items():
            assert data.data_type == inputs[name].data_type, (config.name, name)
            assert list(data.dims) == list(inputs[name].dims), (config.name, name)
            kind = data.WhichOneof("input_data_type")
            integer = model_config_pb2.DataType.Name(data.data_type).startswith("TYPE_INT")
            assert kind == ("zero_data" if integer else "random_data"), (config.name, name)


def test_gpu_configs_cache_engines_profile_batches_and_warm_up(gpu_repo):
    """The TensorRT engine and timing caches, one directory per model right under the cache
    path (ONNX Runtime creates one level), the engines' named by this build; an optimization
    profile per input for the batcher's whole range; a warmup of every input."""
    manifest = json.loads((gpu_repo / MANIFEST).read_text())
    key = manifest["trt_cache_key"]
    assert key and manifest["settings"]["trt_cache_path"] == DEFAULT_TRT_CACHE_PATH
    root = PurePosixPath(DEFAULT_TRT_CACHE_PATH)
    directories = []
    for name in ONNX:
        config = _parse(gpu_repo / name / "config.pbtxt")
        parameters = _accelerator(config)
        assert set(parameters) <= BACKEND_TRT_KEYS, set(parameters) - BACKEND_TRT_KEYS
        assert parameters["trt_engine_cache_enable"] == parameters["trt_timing_cache_enable"] == "1"
        engines = PurePosixPath(parameters["trt_engine_cache_path"])
        timing = PurePosixPath(parameters["trt_timing_cache_path"])
        assert engines == root / f"{key}.{name}" and timing == root / f"timing.{name}"
        directories += [engines, timing]

        inputs = {i.name: list(i.dims) for i in config.input}
        preferred = list(config.dynamic_batching.preferred_batch_size) or [config.max_batch_size]
        profile = {
            level: _shapes(parameters[f"trt_profile_{level}_shapes"])
            for level in ("min", "opt", "max")
        }
        for level, shapes in profile.items():
            assert set(shapes) == set(inputs), (name, level)  # every (dynamic) input
        for input_name, dims in inputs.items():
            low, opt, high = (profile[level][input_name] for level in ("min", "opt", "max"))
            assert (low[0], high[0]) == (1, config.max_batch_size), (name, input_name)
            assert opt[0] == max(preferred), (name, input_name)
            # What the config sends is the opt and max shape; min may only shorten a dimension.
            assert opt[1:] == high[1:] == dims, (name, input_name)
            assert all(1 <= a <= b for a, b in zip(low, high, strict=True)), (name, input_name)
        _check_warmup(config)
    assert len(set(directories)) == len(directories)  # no two models create the same directory
    assert all(d.parent == root for d in directories)
    # The ranker's sequence may be shorter in the engine (the graph takes any length).
    ranker = _parse(gpu_repo / "edje_ranker" / "config.pbtxt")
    low = _shapes(_accelerator(ranker)["trt_profile_min_shapes"])
    assert low["input_ids"] == [1, 1] and low["compressed_tokens"] == [1, 64, 384]


def test_cuda_configs_warm_up_without_tensorrt(cuda_repo):
    manifest = json.loads((cuda_repo / MANIFEST).read_text())
    assert manifest["trt_cache_key"] == ""
    for name in ONNX:
        config = _parse(cuda_repo / name / "config.pbtxt")
        assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        assert not config.HasField("optimization"), name
        _check_warmup(config)


def test_trt_cache_path_flag(tmp_path, capsys):
    settings = RepoSettings(runtime="onnxruntime", gpu=True, tensorrt=True, trt_cache_path="/e/c")
    settings.validate()
    dims = {"pair_length": 8, "num_tokens": 4, "token_width": 2, "image_size": 4, "text_length": 3}
    lines = gpu_config_lines(gpu_models(settings, dims)["text_gpu"], settings, "k")
    assert '"/e/c/k.edje_text_encoder"' in lines and '"/e/c/timing.edje_text_encoder"' in lines
    args = ["--runtime", "onnxruntime", "--gpu", "--tensorrt", "--output", str(tmp_path / "r")]
    for bad in ("trt-cache", "/trt-cache/", "/trt cache", '/trt"cache'):
        assert main([*args, "--trt-cache-path", bad]) == 2
        assert "--trt-cache-path must be an absolute directory path" in capsys.readouterr().err


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
