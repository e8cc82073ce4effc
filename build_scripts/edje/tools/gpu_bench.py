"""GPU throughput of EDJE at real size, in one prepared command of at most 5 minutes.

    python -m edje.tools.gpu_bench --out gpu_bench.json
    python -m edje.tools.gpu_bench --smoke --out smoke.json    # any CPU, seconds: CI

Needs only PyTorch with CUDA: no TensorRT, no model hub. Weights are random at the published
sizes (``edje.configuration``: MiniLM-L12-H384 ranker with Q=64 image tokens, SigLIP2 ViT-L/16 at
384 px with the token-compression adapter); throughput does not depend on their values.

Measured, each cell CUDA-synchronised over ``--seconds`` after a warm-up:

* the ranker's pairs/s at batches 256, 512, 1024, 2048 and 4096, pair length 81 (a 16-token
  query + 64 image tokens + [SEP], as ``make bench``), for torch bf16 eager; torch bf16 with
  ``torch.compile`` (``--compile-mode``, default ``reduce-overhead``: CUDA graphs); and ONNX
  Runtime's CUDA provider, fp32 and fp16, where ``onnxruntime-gpu`` is installed (skipped with
  the reason otherwise);
* the vision adapter's indexing throughput (torch bf16 eager): images/s, and tokens/s at
  Q tokens per image.

A time budget (``--budget-s``, 270 s) guards the whole run: cells that would start past it are
skipped, and the JSON and the table say which. The compiled cells run last, since their compile
time is the least predictable (a few minutes with ``max-autotune``). The best ranker figure is
set against the model card's ~50k pairs/s, marked met or short. ``--smoke`` runs the same code on
tiny models and batches (on CPU when there is no GPU; the compiled cell then uses dynamo's
``eager`` backend and ONNX Runtime its CPU provider), so CI exercises everything but the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edje.configuration import (
    ADAPTER_MLP_DIM,
    PUBLISHED_NUM_TOKENS,
    published_language_config,
    published_vision_config,
)
from edje.modeling import build_pair_layout

TARGET_PAIRS_PER_S = 50_000  # the model card's figure
RANKER_BATCHES = (256, 512, 1024, 2048, 4096)
VISION_BATCHES = (32, 64, 128)
TEXT_LEN = 16  # [CLS] + 14 word pieces + [SEP], as make bench
CLS_ID, SEP_ID = 101, 102
ORT_PRECISIONS = ("fp32", "fp16")


@dataclass
class Sizes:
    """The models and batches one run measures."""

    language: object
    vision: object
    num_tokens: int
    adapter_mlp_dim: int
    ranker_batches: tuple[int, ...]
    vision_batches: tuple[int, ...]


def real_sizes() -> Sizes:
    return Sizes(
        published_language_config(),
        published_vision_config(),
        PUBLISHED_NUM_TOKENS,
        ADAPTER_MLP_DIM,
        RANKER_BATCHES,
        VISION_BATCHES,
    )


def smoke_sizes() -> Sizes:
    """The published architectures shrunk to a few thousand weights: seconds on a CPU."""
    language, vision = published_language_config(), published_vision_config()
    small = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
    language.update({**small, "vocab_size": 200, "num_hidden_layers": 2})
    vision.update({**small, "image_size": 32, "num_hidden_layers": 1})
    return Sizes(language, vision, 4, 64, (2, 4), (2,))


class Budget:
    """Wall-clock guard: ``allows`` turns false once the budget is spent."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.perf_counter()
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, cell: str) -> bool:
        if self.elapsed() < self.seconds:
            return True
        self.skipped.append(cell)
        return False


def pair_inputs(model, batch: int, text_len: int) -> dict[str, torch.Tensor]:
    """Pair layouts as the ranker is served them, ``[CLS] t... [SEP] <image>xQ [SEP]``
    (``text_len + Q + 1`` positions), made by the model's own ``build_pair_layout`` from random
    words; random fp16 tokens. On the CPU: each engine moves them where it runs."""
    config = model.language_model.config
    generator = torch.Generator().manual_seed(0)
    low, high = config.vocab_size // 2, config.vocab_size - 1
    words = torch.randint(low, high, (batch, text_len), generator=generator)
    words[:, 0] = min(CLS_ID, config.vocab_size - 1)
    words[:, -1] = min(SEP_ID, config.vocab_size - 1)
    ids, mask, types = build_pair_layout(
        words, torch.ones_like(words), model.num_compressed_tokens, model.image_token_id
    )
    width = config.hidden_size
    tokens = torch.randn(batch, model.num_compressed_tokens, width, generator=generator)
    return {
        "input_ids": ids.contiguous(),
        "attention_mask": mask.contiguous(),
        "token_type_ids": types.contiguous(),
        "compressed_tokens": tokens.half(),
    }


class RankerGraph(nn.Module):
    """The ranker as one callable of its four tensors (what is compiled and exported)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids, compressed_tokens):
        return self.model.score_pairs(input_ids, attention_mask, token_type_ids, compressed_tokens)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run, device: torch.device, seconds: float, warmup: int = 3) -> tuple[float, int]:
    """(seconds per call, calls timed): ``warmup`` untimed calls (CUDA graph trees record on a
    later call than the first), then at least 3 timed calls and until ``seconds`` have passed,
    synchronised on the device."""
    for _ in range(warmup):
        run()
    synchronize(device)
    start, calls = time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - start < seconds:
        run()
        calls += 1
        if calls % 4 == 0:
            synchronize(device)
    synchronize(device)
    return (time.perf_counter() - start) / calls, calls


def cell(per_call: float, calls: int, items: int, unit: str) -> dict:
    return {f"{unit}_per_s": items / per_call, "ms_per_batch": 1000 * per_call, "calls": calls}


def run_cells(name, batches, measure, budget: Budget, device, out: dict) -> None:
    """Fill ``out[str(batch)]`` with ``measure(batch)`` (a dict), or why it was not measured."""
    for batch in batches:
        label = f"{name} @ {batch}"
        if not budget.allows(label):
            out[str(batch)] = {"skipped": f"time budget ({budget.seconds:.0f} s) spent"}
            continue
        try:
            out[str(batch)] = measure(batch)
        except torch.cuda.OutOfMemoryError:
            out[str(batch)] = {"skipped": "out of GPU memory"}
            torch.cuda.empty_cache()
        except Exception as exc:  # one failing cell must not lose the others
            out[str(batch)] = {"skipped": f"{type(exc).__name__}: {exc}"[:300]}
        print(f"  {label}: {out[str(batch)]}", flush=True)


def torch_ranker(model, sizes, args, device, budget, compiled: bool) -> tuple[dict, dict]:
    """pairs/s of the bf16 ranker, eager or compiled; and notes (compile time, mode)."""
    graph = RankerGraph(model).to(device, torch.bfloat16).eval()
    notes: dict = {}
    if compiled:
        if device.type == "cuda":
            graph = torch.compile(graph, mode=args.compile_mode, dynamic=True)
            notes["compile"] = {"mode": args.compile_mode, "dynamic": True}
        else:  # smoke on a CPU: dynamo's capture only (inductor's C++ build takes minutes)
            graph = torch.compile(graph, backend="eager", dynamic=True)
            notes["compile"] = {"backend": "eager (CPU smoke)", "dynamic": True}

    def measure(batch: int) -> dict:
        feeds = pair_inputs(model, batch, args.text_len)
        feeds["compressed_tokens"] = feeds["compressed_tokens"].to(torch.bfloat16)
        inputs = [tensor.to(device) for tensor in feeds.values()]
        with torch.no_grad():
            first = time.perf_counter()
            graph(*inputs)  # compiles (or records a CUDA graph) for this shape
            synchronize(device)
            first = time.perf_counter() - first
            per_call, calls = timed(lambda: graph(*inputs), device, args.seconds)
        return {**cell(per_call, calls, batch, "pairs"), "first_call_s": round(first, 3)}

    name = "torch_bf16_compile" if compiled else "torch_bf16_eager"
    results: dict = {}
    run_cells(name, sizes.ranker_batches, measure, budget, device, results)
    graph.cpu()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results, notes


def ort_provider(smoke: bool) -> tuple[str | None, str]:
    """(the ONNX Runtime provider to measure, or None; why)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime is not installed"
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return "CUDAExecutionProvider", f"onnxruntime {ort.__version__}"
    if smoke:
        return "CPUExecutionProvider", "no CUDA provider: the smoke run uses the CPU provider"
    return None, (
        f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: "
        f"{', '.join(available)}): install onnxruntime-gpu"
    )


def ort_engines(provider: str | None) -> tuple[str, ...]:
    """The ONNX Runtime cells' names: ``ort_cuda_fp32`` ... (``ort_cpu_*`` in a CPU smoke run)."""
    where = "cpu" if provider == "CPUExecutionProvider" else "cuda"
    return tuple(f"ort_{where}_{precision}" for precision in ORT_PRECISIONS)


def ort_ranker(model, sizes, args, budget, provider: str, work: Path) -> dict:
    """pairs/s through ONNX Runtime (the exported fp32 graph, and its fp16 conversion), inputs
    and outputs bound on the device (I/O binding), so no host copies are timed."""
    import onnx
    import onnxruntime as ort

    from edje.onnx_export import export_ranker

    fp32_name, fp16_name = ort_engines(provider)
    if not budget.allows("ort export"):
        return {
            e: {"skipped": f"time budget ({budget.seconds:.0f} s) spent"}
            for e in ort_engines(provider)
        }
    results: dict = {}
    fp32 = export_ranker(model.float().cpu().eval(), work / "ranker_fp32.onnx")
    graphs = {fp32_name: fp32}
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        fp16 = work / "ranker_fp16.onnx"
        onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(fp16))
        graphs[fp16_name] = fp16
    except Exception as exc:
        results[fp16_name] = {"skipped": f"fp16 conversion failed: {exc}"[:300]}
    device_name = "cpu" if provider == "CPUExecutionProvider" else "cuda"
    for engine, path in graphs.items():
        try:
            session = ort.InferenceSession(str(path), providers=[provider])
        except Exception as exc:
            results[engine] = {"skipped": f"session: {exc}"[:300]}
            continue

        def measure(batch: int, session=session) -> dict:
            feeds = pair_inputs(model, batch, args.text_len)
            binding = session.io_binding()
            # The device copies stay referenced while the binding is used.
            values = {
                k: ort.OrtValue.ortvalue_from_numpy(v.numpy(), device_name, 0)
                for k, v in feeds.items()
            }
            for name, value in values.items():
                binding.bind_ortvalue_input(name, value)
            binding.bind_output("score", device_name)
            per_call, calls = timed(
                lambda: session.run_with_iobinding(binding), torch.device("cpu"), args.seconds
            )
            return cell(per_call, calls, batch, "pairs")

        results[engine] = {}
        run_cells(
            engine, sizes.ranker_batches, measure, budget, torch.device("cpu"), results[engine]
        )
    return results


def vision_adapter(sizes, args, device, budget) -> dict:
    """Images/s and tokens/s of the indexing model (ViT + adapter), torch bf16 eager."""
    from edje.modeling import EDJEModelForIndexing

    with torch.device(device):  # random init on the GPU: seconds, not a minute, for a ViT-L
        model = EDJEModelForIndexing(
            vision_config=sizes.vision,
            language_config=sizes.language,
            num_compressed_tokens=sizes.num_tokens,
            adapter_mlp_dim=sizes.adapter_mlp_dim,
            load_pretrained=False,
        )
    model = model.to(device, torch.bfloat16).eval()
    size = model.image_size

    def measure(batch: int) -> dict:
        pixels = torch.randn(batch, 3, size, size, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            per_call, calls = timed(lambda: model.encode(pixels), device, args.seconds)
        result = cell(per_call, calls, batch, "images")
        result["tokens_per_s"] = result["images_per_s"] * sizes.num_tokens
        return result

    batches: dict = {}
    run_cells("vision_bf16_eager", sizes.vision_batches, measure, budget, device, batches)
    model.cpu()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "engine": "torch_bf16_eager",
        "image_size": size,
        "patches_per_image": (size // sizes.vision.patch_size) ** 2,
        "tokens_per_image": sizes.num_tokens,
        "batches": batches,
    }


def best_ranker(ranker: dict) -> dict | None:
    cells = [
        {"engine": engine, "batch": int(batch), "pairs_per_s": result["pairs_per_s"]}
        for engine, by_batch in ranker.items()
        for batch, result in by_batch.items()
        if "pairs_per_s" in result
    ]
    return max(cells, key=lambda c: c["pairs_per_s"], default=None)


def judge(best: dict | None, smoke: bool) -> str:
    """The best ranker cell against the model card's figure: met or short."""
    if smoke:
        return "not judged (smoke sizes)"
    return "met" if best and best["pairs_per_s"] >= TARGET_PAIRS_PER_S else "short"


def table(results: dict) -> str:
    """The printed summary: pairs/s per engine and batch, the vision adapter, the target."""
    batches = [str(b) for b in results["ranker_batches"]]
    lines = [
        f"EDJE GPU benchmark on {results['device']} ({results['mode']}), pair length "
        f"{results['pair_length']}, {results['elapsed_s']:.0f} s of a {results['budget_s']:.0f} s "
        "budget",
        "",
        "| ranker, pairs/s | " + " | ".join(batches) + " |",
        "| --- |" + " --- |" * len(batches),
    ]
    for engine, by_batch in results["ranker"].items():
        row = []
        for batch in batches:
            result = by_batch.get(batch, {})
            row.append(f"{result['pairs_per_s']:,.0f}" if "pairs_per_s" in result else "skipped")
        lines.append(f"| {engine} | " + " | ".join(row) + " |")
    vision = results["vision"]
    lines += ["", f"| vision adapter ({vision.get('engine', '-')}) | images/s | tokens/s |"]
    lines.append("| --- | --- | --- |")
    for batch, result in vision.get("batches", {}).items():
        if "images_per_s" in result:
            lines.append(
                f"| batch {batch} | {result['images_per_s']:,.0f} | {result['tokens_per_s']:,.0f} |"
            )
        else:
            lines.append(f"| batch {batch} | skipped | skipped |")
    lines.append(f"tokens per image: {vision.get('tokens_per_image')}")
    target = results["target"]
    best = target["best"]
    lines.append("")
    if best:
        lines.append(
            f"target ~{target['pairs_per_s']:,} pairs/s (model card): best "
            f"{best['pairs_per_s']:,.0f} ({best['engine']} @ {best['batch']}): {target['status']}"
        )
    else:
        lines.append(f"target ~{target['pairs_per_s']:,} pairs/s: nothing measured")
    for name, reason in results["skipped_engines"].items():
        lines.append(f"skipped {name}: {reason}")
    if results["over_budget"]:
        lines.append("time budget spent; not measured: " + ", ".join(results["over_budget"]))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m edje.tools.gpu_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="gpu_bench.json", help="the JSON results")
    p.add_argument("--work", default="build/gpu_bench", help="exported ONNX graphs")
    p.add_argument(
        "--seconds", type=float, default=None, help="timed seconds per cell (2; 0.1 in --smoke)"
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="skip cells that would start later (270; 60 in --smoke)",
    )
    p.add_argument(
        "--text-len", type=int, default=TEXT_LEN, help=f"query tokens (default {TEXT_LEN})"
    )
    p.add_argument(
        "--compile-mode",
        default="reduce-overhead",
        choices=("reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "default"),
        help="torch.compile mode (reduce-overhead: CUDA graphs; max-autotune also tunes kernels, "
        "and its compile alone can outlast the budget)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes, CPU allowed: seconds, for CI")
    args = p.parse_args(argv)
    if args.seconds is None:
        args.seconds = 0.1 if args.smoke else 2.0
    if args.budget_s is None:
        args.budget_s = 60.0 if args.smoke else 270.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print(
            "no CUDA device: this benchmark needs a GPU (--smoke runs it on a CPU)", file=sys.stderr
        )
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    sizes = smoke_sizes() if args.smoke else real_sizes()
    from edje.modeling import EDJEModelForRanking

    model = EDJEModelForRanking(
        language_config=sizes.language, num_compressed_tokens=sizes.num_tokens
    ).eval()
    results: dict = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "mode": "smoke" if args.smoke else "full",
        "torch": torch.__version__,
        "pair_length": args.text_len + sizes.num_tokens + 1,
        "num_tokens": sizes.num_tokens,
        "ranker_batches": list(sizes.ranker_batches),
        "seconds_per_cell": args.seconds,
        "budget_s": args.budget_s,
        "ranker": {},
        "notes": {},
        "skipped_engines": {},
    }
    # Cheap and robust cells first; torch.compile, whose compile time is the least predictable,
    # last: if it outlasts the budget, everything else has been measured.
    print(f"ranker: {results['pair_length']} positions, batches {sizes.ranker_batches}", flush=True)
    by_batch, _ = torch_ranker(model, sizes, args, device, budget, compiled=False)
    results["ranker"]["torch_bf16_eager"] = by_batch
    provider, why = ort_provider(args.smoke)
    results["notes"]["onnxruntime"] = why
    if provider is None:
        for engine in ort_engines(provider):
            results["skipped_engines"][engine] = why
    else:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        results["notes"]["ort_provider"] = provider
        for engine, by_batch in ort_ranker(model, sizes, args, budget, provider, work).items():
            if "skipped" in by_batch:
                results["skipped_engines"][engine] = by_batch["skipped"]
            else:
                results["ranker"][engine] = by_batch
    print(f"vision adapter: batches {sizes.vision_batches}", flush=True)
    if budget.allows("vision adapter"):
        results["vision"] = vision_adapter(sizes, args, device, budget)
    else:
        results["vision"] = {"skipped": f"time budget ({budget.seconds:.0f} s) spent"}
    print("ranker, torch.compile: compiles on the first batch", flush=True)
    by_batch, notes = torch_ranker(model, sizes, args, device, budget, compiled=True)
    results["ranker"]["torch_bf16_compile"] = by_batch
    results["notes"].update(notes)
    best = best_ranker(results["ranker"])
    results["target"] = {
        "pairs_per_s": TARGET_PAIRS_PER_S,
        "best": best,
        "status": judge(best, args.smoke),
    }
    results["over_budget"] = budget.skipped
    results["elapsed_s"] = budget.elapsed()
    print(table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
