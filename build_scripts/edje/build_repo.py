"""Build a servable Triton model repository from an EDJE model source.

Steps: load the models (checkpoint strictly checked), copy each template folder of
``model_repository/`` as it is (``config.pbtxt`` with its ``${placeholders}`` filled, the files
of its ``1/``, and every ``_shared/*.py`` helper beside each ``model.py``), export the ONNX
graphs and write the tokenizers. Two runtimes:

* ``python``: the embedded server (``make serve``). Each ONNX model runs in ONNX Runtime inside a
  Python-backend model (its ``1/model.py`` imports the shared ``onnx_runner``), with the same
  tensors and batching.
* ``onnxruntime``: Triton's ONNX Runtime backend, as in NVIDIA's container; the ONNX models keep
  only ``model.onnx``. ``--gpu`` puts instances on GPUs and warms every ONNX model up before it
  reports ready (``model_warmup``); ``--tensorrt`` adds the TensorRT FP16 accelerator with
  explicit optimization profiles and its engine and timing caches on ``--trt-cache-path`` (a
  volume the pods share: docs/deploy.md, "TensorRT engine cache").

The repository is written to a temporary directory and moved into place at the end, so a failed
build never leaves a half-built repository behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import string
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edje.configuration import PUBLISHED_NUM_TOKENS

log = logging.getLogger("edje.build_repo")

# The templates live at the top of the source tree (model_repository/), beside this package, so
# the builder runs from a checkout (pip install -e .); EDJE_TEMPLATES points elsewhere.
TEMPLATE_DIR = Path(
    os.environ.get("EDJE_TEMPLATES", Path(__file__).resolve().parents[2] / "model_repository")
)
DEFAULT_SOURCE_DIR = Path(__file__).resolve().parent / "default_model"
MANIFEST = "edje_manifest.json"
# The models of a repository: template folders under model_repository/, each copied by
# copy_model. The bank's are included only with a token bank (--token-bank): rank by image id.
MODELS = (
    "edje_index",
    "edje_preprocess",
    "edje_vision_adapter",
    "edje_rank",
    "edje_tokenizer",
    "edje_ranker",
    "edje_text_embed",
    "edje_text_tokenizer",
    "edje_text_encoder",
)
BANK_MODELS = ("edje_token_bank", "edje_rank_by_id")
SHARED_DIR = "_shared"  # helpers copied beside every model.py

# The TensorRT accelerator's parameters, by the names of Triton's onnxruntime backend (which
# refuses a key it does not know: the model then fails to load).
TENSORRT_FP16 = {"precision_mode": "FP16", "max_workspace_size_bytes": str(1 << 30)}
DEFAULT_TRT_CACHE_PATH = "/trt-cache"


@dataclass(frozen=True)
class GpuModel:
    """What the GPU-only lines of one ONNX model's config are generated from: its inputs as
    its template declares them, and the batch range Triton's dynamic batcher sends it."""

    name: str
    inputs: tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, Triton data type, dims)
    max_batch: int
    opt_batch: int
    # Inputs whose first dimension the profile lets range from 1 to its dims (the ranker's
    # sequence: the graph takes any length, though the config's fixed dims send the full one).
    variable_length: tuple[str, ...] = ()


def gpu_models(settings: RepoSettings, dims: dict[str, int]) -> dict[str, GpuModel]:
    """The three ONNX models, keyed by the placeholder their template carries."""
    pair, tokens = (dims["pair_length"],), (dims["num_tokens"], dims["token_width"])
    size = dims["image_size"]
    layout = ("input_ids", "attention_mask", "token_type_ids")
    return {
        "ranker_gpu": GpuModel(
            "edje_ranker",
            (
                *((name, "TYPE_INT64", pair) for name in layout),
                ("compressed_tokens", "TYPE_FP16", tokens),
            ),
            settings.rank_max_batch_size,
            largest_preferred(settings.rank_preferred_batch_sizes, settings.rank_max_batch_size),
            layout,
        ),
        "vision_gpu": GpuModel(
            "edje_vision_adapter",
            (("pixel_values", "TYPE_FP32", (3, size, size)),),
            settings.index_max_batch_size,
            largest_preferred(settings.index_preferred_batch_sizes, settings.index_max_batch_size),
        ),
        "text_gpu": GpuModel(
            "edje_text_encoder",
            (("input_ids", "TYPE_INT64", (dims["text_length"],)),),
            settings.text_max_batch_size,
            settings.text_max_batch_size,
        ),
    }


def largest_preferred(preferred: str, max_batch: int) -> int:
    """The largest preferred batch size the batcher can form (the profile's opt batch)."""
    sizes = [int(x) for x in preferred.replace(",", " ").split() if int(x) <= max_batch]
    return max(sizes, default=max_batch)


def trt_cache_key(model_id: str) -> str:
    """One build's name in the engine cache: when it was built, and from which weights.

    ONNX Runtime names an engine after the graph's file and tensor names (and its own, CUDA's
    and TensorRT's versions), never after the weights: a retrained model of the same graph would
    load the old model's engine. So every build caches its engines in directories of its own.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{stamp}-{model_id.rpartition(':')[2][:12]}"


def profile_shapes(model: GpuModel, level: str) -> str:
    """One ``trt_profile_{min,opt,max}_shapes`` value: ``name:BxD1xD2,...`` for every input
    (ONNX Runtime needs all dynamic inputs in the profile)."""
    batch = {"min": 1, "opt": model.opt_batch, "max": model.max_batch}[level]
    shapes = []
    for name, _, dims in model.inputs:
        if level == "min" and name in model.variable_length:
            dims = (1, *dims[1:])
        shapes.append(f"{name}:" + "x".join(map(str, (batch, *dims))))
    return ",".join(shapes)


def gpu_config_lines(model: GpuModel, settings: RepoSettings, cache_key: str) -> str:
    """The lines only a GPU repository's config carries (empty for CPU ones).

    ``--gpu``: a ``model_warmup`` at batch 1 and at the largest batch, so the model reports
    ready with its CUDA memory, kernels (and TensorRT engines) in place. Token ids are zeros
    (random bytes would be ids outside the vocabulary); float inputs are random.
    ``--tensorrt``: FP16 with an explicit optimization profile per input (batch 1 / the largest
    preferred / the largest batch, the ranker's sequence 1..its length) and the engine and
    timing caches on ``settings.trt_cache_path``, one directory per model (ONNX Runtime creates
    one directory level; one per model keeps parallel model loads from racing to create it).
    """
    if not settings.gpu:
        return ""
    lines = []
    if settings.tensorrt:
        root = settings.trt_cache_path
        parameters = {
            **TENSORRT_FP16,
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": f"{root}/{cache_key}.{model.name}",
            "trt_timing_cache_enable": "1",
            "trt_timing_cache_path": f"{root}/timing.{model.name}",
        }
        for level in ("min", "opt", "max"):
            parameters[f"trt_profile_{level}_shapes"] = profile_shapes(model, level)
        lines += [
            "optimization { execution_accelerators { gpu_execution_accelerator: [ {",
            '  name: "tensorrt"',
            *(f'  parameters {{ key: "{k}", value: "{v}" }}' for k, v in parameters.items()),
            "} ] } }",
        ]
    lines.append("model_warmup [")
    batches = sorted({1, model.max_batch})
    for batch in batches:
        lines.append(f'  {{ name: "batch_{batch}", batch_size: {batch}, count: 1, inputs [')
        for i, (name, dtype, dims) in enumerate(model.inputs):
            data = "zero_data" if dtype.startswith("TYPE_INT") else "random_data"
            shape = ", ".join(map(str, dims))
            comma = "," if i < len(model.inputs) - 1 else ""
            lines.append(
                f'    {{ key: "{name}", value: {{ data_type: {dtype}, dims: [ {shape} ], '
                f"{data}: true }} }}{comma}"
            )
        lines.append("  ] }" + ("," if batch != batches[-1] else ""))
    lines.append("]")
    return "\n".join(lines)


@dataclass
class RepoSettings:
    """Deploy-time settings written into the configs."""

    runtime: str = "python"
    gpu: bool = False
    tensorrt: bool = False
    index_max_batch_size: int = 32
    index_preferred_batch_sizes: str = "8, 16, 32"
    index_queue_delay_us: int = 2000
    index_max_queue_size: int = 64
    index_queue_timeout_us: int = 30_000_000
    rank_max_batch_size: int = 256
    rank_preferred_batch_sizes: str = "64, 128, 256"
    # The ranker's defaults (delay, instances, threads) are the serving sweep's choice
    # (docs/serving.json, `python -m edje.tools.bench_serving`).
    rank_queue_delay_us: int = 200
    # The query tokenizer has no preferred batch sizes, so a lone request always waits out its
    # whole delay; under load, requests that queue while it runs still batch.
    tokenizer_queue_delay_us: int = 0
    rank_max_queue_size: int = 128
    rank_queue_timeout_us: int = 5_000_000
    text_max_batch_size: int = 64
    text_queue_delay_us: int = 1000
    preprocess_instances: int = 1
    vision_instances: int = 1
    tokenizer_instances: int = 1
    ranker_instances: int = 2
    intra_op_threads: int = 1
    allow_spinning: int = 1
    decode_threads: int = 4
    max_image_pixels: int = 50_000_000
    max_image_bytes: int = 32 * 1024 * 1024
    token_bank: str = ""
    max_bank_bytes: int = 0
    quantize_ranker: str = ""
    trt_cache_path: str = DEFAULT_TRT_CACHE_PATH

    def validate(self) -> None:
        if self.runtime not in ("python", "onnxruntime"):
            raise ValueError(f"runtime must be 'python' or 'onnxruntime', got {self.runtime!r}")
        if (self.gpu or self.tensorrt) and self.runtime != "onnxruntime":
            raise ValueError("--gpu/--tensorrt need --runtime onnxruntime (NVIDIA's container)")
        if self.tensorrt and not self.gpu:
            raise ValueError("--tensorrt needs --gpu")
        if self.allow_spinning not in (0, 1):
            raise ValueError(f"--allow-spinning takes 0 or 1, got {self.allow_spinning!r}")
        if self.quantize_ranker not in ("", "int8"):
            raise ValueError(f"--quantize-ranker takes 'int8', got {self.quantize_ranker!r}")
        if not re.fullmatch(r"(/[\w.-]+)+", self.trt_cache_path):
            raise ValueError(
                "--trt-cache-path must be an absolute directory path of letters, digits, "
                f"'_', '.', '-' and '/' (no trailing '/'), got {self.trt_cache_path!r}"
            )


# Integer settings that edje-build-repo exposes, with their help (None: the name says it).
INT_OPTIONS = {
    "rank_max_batch_size": None,
    "rank_queue_delay_us": "the ranker's dynamic-batching delay, microseconds",
    "tokenizer_queue_delay_us": "the query tokenizer's dynamic-batching delay, microseconds",
    "index_max_batch_size": None,
    "rank_max_queue_size": "ranker requests queued before new ones are refused with UNAVAILABLE",
    "rank_queue_timeout_us": "a ranker request queued longer is refused (0: no timeout)",
    "ranker_instances": None,
    "intra_op_threads": "ONNX Runtime threads per ONNX model instance (0: ORT's default)",
    "allow_spinning": "1: ONNX Runtime's threads spin-wait for work (ORT's default); 0: they "
    "sleep (python runtime; Triton's onnxruntime backend does not read it)",
    "max_image_pixels": "refuse larger images (decompression-bomb guard)",
    "max_bank_bytes": "refuse a token bank whose tokens exceed this (0: the machine's RAM or "
    "the container's memory limit)",
}


def template_values(
    source,
    settings: RepoSettings,
    dims: dict[str, int],
    tokenizer,
    text_tokenizer,
    cache_key: str = "",
) -> dict:
    """Every ``${placeholder}`` value for the config templates (``cache_key``: the build's
    engine-cache name, for ``--tensorrt``)."""
    processor = source.image_processor()
    if settings.runtime == "python":
        backend = 'backend: "python"'
    else:
        backend = 'backend: "onnxruntime"\ndefault_model_filename: "model.onnx"'
    values = {k: str(v) for k, v in asdict(settings).items()}
    values.update(
        runtime_backend=backend,
        instance_kind="KIND_GPU" if settings.gpu else "KIND_CPU",
        **{
            placeholder: gpu_config_lines(model, settings, cache_key)
            for placeholder, model in gpu_models(settings, dims).items()
        },
        image_size=str(dims["image_size"]),
        num_tokens=str(dims["num_tokens"]),
        token_width=str(dims["token_width"]),
        embedding_dim=str(dims["embedding_dim"]),
        pair_length=str(dims["pair_length"]),
        text_length=str(dims["text_length"]),
        resample=str(int(processor.resample)),
        rescale_factor=repr(float(processor.rescale_factor)),
        image_mean=",".join(repr(float(x)) for x in processor.image_mean),
        image_std=",".join(repr(float(x)) for x in processor.image_std),
        pad_token_id=str(tokenizer.pad_token_id),
        pad_token=tokenizer.pad_token,
        text_pad_token_id=str(text_tokenizer.pad_token_id),
        text_pad_token=text_tokenizer.pad_token,
        bank_path=settings.token_bank
        if "://" in settings.token_bank
        else (str(Path(settings.token_bank).resolve()) if settings.token_bank else ""),
        model_id=source.model_id,
    )
    return values


def fill_template(path: Path, values: dict[str, str]) -> str:
    """Substitute placeholders; an unknown ``${name}`` is an error naming the file."""
    try:
        return string.Template(path.read_text()).substitute(values)
    except KeyError as exc:
        raise KeyError(f"{path}: no value for placeholder ${{{exc.args[0]}}}") from None


def copy_model(template: Path, target: Path, values: dict[str, str], helpers: list[Path]) -> None:
    """Copy one model folder as it is: ``config.pbtxt`` filled, the files of its ``1/``, and
    every shared helper beside its ``model.py``.

    The one rule for code: Python files go only to models whose (filled) config says
    ``backend: "python"``. So in the ``onnxruntime`` runtime an ONNX model keeps only its
    ``model.onnx`` (written later by the export), and Triton's ONNX Runtime backend runs it.
    """
    config = fill_template(template / "config.pbtxt", values)
    (target / "1").mkdir(parents=True)
    (target / "config.pbtxt").write_text(config)
    files = sorted(p for p in (template / "1").glob("*") if p.is_file())
    if not re.search(r'^backend:\s*"python"', config, re.MULTILINE):
        files = [p for p in files if p.suffix != ".py"]
    elif any(p.name == "model.py" for p in files):
        files += helpers
    for path in files:
        shutil.copy2(path, target / "1" / path.name)


def build_repository(source, output: str | Path, settings: RepoSettings | None = None) -> Path:
    """Export ``source`` into a Triton model repository at ``output`` (replacing it)."""
    from edje.onnx_export import (
        export_ranker,
        export_text_encoder,
        export_vision_adapter,
        optimize_ranker,
        quantize_int8,
    )

    settings = settings or RepoSettings()
    settings.validate()
    if not (TEMPLATE_DIR / "edje_rank" / "config.pbtxt").is_file():
        raise FileNotFoundError(
            f"model_repository templates not found at {TEMPLATE_DIR}: run from a checkout "
            "installed with `pip install -e .`, or set EDJE_TEMPLATES to its model_repository/"
        )
    output = Path(output)
    staging = output.with_name(output.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)

    log.info("loading models from %s", source.checkpoint)
    indexing, index_report = source.build_indexing_model()
    ranking, rank_report = source.build_ranking_model()
    text_model, text_report = source.build_text_model()
    log.info(index_report.summary("indexing model"))
    log.info(rank_report.summary("ranking model"))
    log.info(
        text_report.summary("first-stage text tower")
        if text_report
        else f"first-stage text tower: pretrained weights from {source.siglip_path}"
    )
    tokenizer, text_tokenizer = source.tokenizer(), source.text_tokenizer()
    embedding_dim = indexing.vision_encoder.config.hidden_size
    if text_model.config.projection_size != embedding_dim:
        raise ValueError(
            f"text embedding width {text_model.config.projection_size} differs from the image "
            f"embedding width {embedding_dim}: they must share one space"
        )
    dims = source.edje_config(indexing, ranking, text_tokenizer).dims()
    cache_key = trt_cache_key(source.model_id) if settings.tensorrt else ""
    values = template_values(source, settings, dims, tokenizer, text_tokenizer, cache_key)
    helpers = sorted((TEMPLATE_DIR / SHARED_DIR).glob("*.py"))
    for name in (*MODELS, *(BANK_MODELS if settings.token_bank else ())):
        copy_model(TEMPLATE_DIR / name, staging / name, values, helpers)

    log.info("exporting ONNX models")
    export_vision_adapter(indexing, staging / "edje_vision_adapter" / "1" / "model.onnx")
    ranker_path = export_ranker(ranking, staging / "edje_ranker" / "1" / "model.onnx")
    # ONNX Runtime's transformer fusions (docs/optimisations.md), chosen for where the ranker
    # runs; none for TensorRT, which fuses the plain graph itself (ORT's contrib operators would
    # split its engines).
    int8 = settings.quantize_ranker == "int8"
    if int8 or not settings.tensorrt:
        config = ranking.language_model.config
        target = "int8" if int8 else "cuda" if settings.gpu else "cpu"
        fused = optimize_ranker(
            ranker_path, config.num_attention_heads, config.hidden_size, target=target
        )
        layers = config.num_hidden_layers
        report = log.warning if target != "int8" and fused["Attention"] != layers else log.info
        report(
            "ranker fused for %s: %d Attention, %d BiasGelu, %d Gelu (%d layers)",
            target,
            fused["Attention"],
            fused["BiasGelu"],
            fused["Gelu"],
            layers,
        )
    if int8:
        log.info("quantising the ranker to int8 (dynamic, per-channel weights)")
        quantize_int8(ranker_path)
    export_text_encoder(text_model, staging / "edje_text_encoder" / "1" / "model.onnx")
    tokenizer.backend_tokenizer.save(str(staging / "edje_tokenizer" / "1" / "tokenizer.json"))
    text_tokenizer.backend_tokenizer.save(
        str(staging / "edje_text_tokenizer" / "1" / "tokenizer.json")
    )

    manifest = {
        "source": source.description,
        "model_id": source.model_id,
        "checkpoint": str(source.checkpoint),
        "random_weights": source.random_weights,
        "settings": asdict(settings),
        "trt_cache_key": cache_key,
        **dims,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(output, ignore_errors=True)
    staging.rename(output)
    return output


def default_source(cache_dir: Path):
    """The embedded default model, or, until one is trained, a tiny random-weight model."""
    from edje.model_source import ModelSource

    for directory in (DEFAULT_SOURCE_DIR, cache_dir):
        if (directory / "edje_config.json").is_file():
            return ModelSource.from_dir(directory)
    from edje.tiny import make_tiny_source

    return make_tiny_source(
        cache_dir, description="tiny EDJE with random weights: rankings are meaningless"
    )


def source_from_args(args: argparse.Namespace):
    """Resolve the model source named on the command line."""
    from edje.model_source import ModelSource

    if args.source:
        return ModelSource.from_dir(args.source)
    if args.checkpoint:
        if not (args.siglip and args.language_model):
            raise SystemExit("--checkpoint needs --siglip and --language-model")
        return ModelSource(
            siglip_path=args.siglip,
            language_model_path=args.language_model,
            checkpoint=args.checkpoint,
            num_compressed_tokens=args.num_compressed_tokens,
            projection_type=args.projection,
            description=f"checkpoint {args.checkpoint}",
        )
    return default_source(Path(args.output).parent / "random_default_source")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="edje-build-repo",
        description="Build a Triton model repository (edje_index, edje_rank and their "
        "components) from an EDJE model source.",
        epilog="Examples:\n"
        "  edje-build-repo --output build/model_repository\n"
        "  edje-build-repo --checkpoint pytorch_model.pth \\\n"
        "      --siglip google/siglip2-large-patch16-384 \\\n"
        "      --language-model microsoft/MiniLM-L12-H384-uncased \\\n"
        "      --runtime onnxruntime --gpu --tensorrt --output /models",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("model source (default: the embedded default model)")
    src.add_argument("--source", help="model source directory holding edje_config.json")
    src.add_argument(
        "--checkpoint", help="EDJE weights: research .pth ({'model': ...}) or .safetensors"
    )
    src.add_argument("--siglip", help="SigLIP model directory or hub name (config + processor)")
    src.add_argument("--language-model", help="MiniLM directory or hub name (config + tokenizer)")
    src.add_argument(
        "--num-compressed-tokens",
        type=int,
        default=PUBLISHED_NUM_TOKENS,
        help=f"Q (default {PUBLISHED_NUM_TOKENS}, the published model's)",
    )
    src.add_argument("--projection", choices=("compressed", "local"), default="compressed")
    out = p.add_argument_group("output")
    out.add_argument("--output", default="build/model_repository", help="repository directory")
    out.add_argument(
        "--runtime",
        choices=("python", "onnxruntime"),
        default="python",
        help="python: embedded server (default); onnxruntime: NVIDIA's container",
    )
    out.add_argument("--gpu", action="store_true", help="KIND_GPU instances (onnxruntime only)")
    out.add_argument("--tensorrt", action="store_true", help="TensorRT FP16 accelerator (--gpu)")
    out.add_argument(
        "--trt-cache-path",
        default=DEFAULT_TRT_CACHE_PATH,
        metavar="DIR",
        help="with --tensorrt: where TensorRT engines and timing caches are kept, a volume the "
        f"server's pods share so a new pod reuses them (default: {DEFAULT_TRT_CACHE_PATH})",
    )
    for name, help_text in INT_OPTIONS.items():
        default = getattr(RepoSettings, name)
        out.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=default,
            help=f"{help_text} (default: {default})" if help_text else f"default: {default}",
        )
    out.add_argument(
        "--quantize-ranker",
        choices=("int8",),
        default="",
        help="dynamic int8 quantisation of the ranker (see docs/performance.md for agreement)",
    )
    out.add_argument(
        "--token-bank",
        default="",
        metavar="COLLECTION",
        help="also serve edje_rank_by_id, ranking the images of this collection (a path or a "
        "dataset URI) by id",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``edje-build-repo``)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    settings = RepoSettings(
        runtime=args.runtime,
        gpu=args.gpu,
        tensorrt=args.tensorrt,
        token_bank=args.token_bank,
        quantize_ranker=args.quantize_ranker,
        trt_cache_path=args.trt_cache_path,
        **{name: getattr(args, name) for name in INT_OPTIONS},
    )
    try:
        settings.validate()
        source = source_from_args(args)
        path = build_repository(source, args.output, settings)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"edje-build-repo: error: {exc}", file=sys.stderr)
        return 2
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest["random_weights"]:
        banner = "!" * 78
        print(
            f"\n{banner}\n!! WARNING: this repository was built from a model with RANDOM "
            f"weights.\n!! Its scores and rankings are meaningless. Build from a real "
            f"checkpoint\n!! (--checkpoint ...) or the trained default model.\n{banner}\n",
            file=sys.stderr,
        )
    print(
        f"built {path} ({args.runtime} runtime): Q={manifest['num_tokens']}, "
        f"D={manifest['token_width']}, E={manifest['embedding_dim']}, "
        f"image {manifest['image_size']}px, pair length {manifest['pair_length']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
