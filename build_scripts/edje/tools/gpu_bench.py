"""GPU throughput of the real-size EDJE ranker: PyTorch bf16, ONNX Runtime CUDA and TensorRT fp16.

Sized to finish in a few minutes on one GPU (the TensorRT engine build dominates); runs
unchanged on any CUDA machine with ``torch`` (CUDA build) and ``onnxruntime-gpu``::

    python -m edje.tools.gpu_bench --out gpu_bench.json

Weights are random (throughput does not depend on them). Pairs are MiniLM-L12-H384 with Q=64
image tokens and 16 text tokens (81 positions), as in ``make bench``. Without CUDA it says so
and exits with code 2; nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edje.configuration import published_language_config
from edje.tools.bench import TEXT_LEN, Q, pair_inputs


def torch_bf16(model, feeds: dict, seconds: float) -> float:
    """Pairs/s of the ranker in bf16 on the GPU (CUDA-synchronised wall time)."""
    model = model.to("cuda", torch.bfloat16)
    inputs = {k: torch.from_numpy(v).cuda() for k, v in feeds.items()}
    inputs["compressed_tokens"] = inputs["compressed_tokens"].to(torch.bfloat16)
    batch = len(feeds["input_ids"])
    with torch.inference_mode():
        for _ in range(3):
            model.score_pairs(**inputs)
        torch.cuda.synchronize()
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            model.score_pairs(**inputs)
            n += 1
        torch.cuda.synchronize()
    return n * batch / (time.perf_counter() - start)


def ort_provider(path: Path, provider: tuple, feeds: dict, seconds: float) -> float | None:
    """Pairs/s through ONNX Runtime with one execution provider (None if unavailable)."""
    import onnxruntime as ort

    if provider[0] not in ort.get_available_providers():
        print(f"  {provider[0]} not available in this onnxruntime build; skipped")
        return None
    session = ort.InferenceSession(str(path), providers=[provider, "CPUExecutionProvider"])
    for _ in range(3):  # TensorRT builds its engine here
        session.run(None, feeds)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        session.run(None, feeds)
        n += 1
    return n * len(feeds["input_ids"]) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=512, help="pairs per call (default 512)")
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per engine")
    p.add_argument("--work", default="build/gpu_bench")
    p.add_argument("--out", default="gpu_bench.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU", file=sys.stderr)
        return 2
    from edje.modeling import EDJEModelForRanking
    from edje.onnx_export import export_ranker

    work = Path(args.work)
    model = EDJEModelForRanking(
        language_config=published_language_config(), num_compressed_tokens=Q
    ).eval()
    path = export_ranker(model, work / "ranker.onnx")
    feeds = pair_inputs(args.batch, TEXT_LEN, model.image_token_id)
    trt_cache = work / "trt_cache"
    trt_cache.mkdir(parents=True, exist_ok=True)
    results = {
        "device": torch.cuda.get_device_name(0),
        "batch": args.batch,
        "pair_length": TEXT_LEN + Q + 1,
        "ort_cuda_fp32": ort_provider(path, ("CUDAExecutionProvider", {}), feeds, args.seconds),
        "ort_tensorrt_fp16": ort_provider(
            path,
            (
                "TensorrtExecutionProvider",
                {
                    "trt_fp16_enable": True,
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(trt_cache),
                },
            ),
            feeds,
            args.seconds,
        ),
        "torch_bf16": torch_bf16(model, feeds, args.seconds),
    }
    print(json.dumps(results, indent=2))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if np.isfinite(results["torch_bf16"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
