"""The GPU benchmark's code runs: ``python -m edje.tools.gpu_bench --smoke`` (tiny models, on CPU
here) in a subprocess, with a timeout, writes the JSON the full run writes. Its numbers mean
nothing; docs/optimisations.md says the full run has not run here (no GPU)."""

from __future__ import annotations

import json
import subprocess
import sys

from edje.tools import gpu_bench


def test_smoke_run_writes_every_cell(tmp_path):
    out = tmp_path / "smoke.json"
    command = [sys.executable, "-m", "edje.tools.gpu_bench", "--smoke", "--out", str(out)]
    command += ["--work", str(tmp_path / "work")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {
        "device",
        "mode",
        "pair_length",
        "ranker_batches",
        "budget_s",
        "elapsed_s",
        "ranker",
        "vision",
        "target",
        "skipped_engines",
        "over_budget",
    } <= set(results)
    assert results["mode"] == "smoke" and results["over_budget"] == []
    batches = [str(b) for b in results["ranker_batches"]]
    ranker = results["ranker"]
    # torch eager and compiled always; ONNX Runtime on its CPU provider here (CUDA on a GPU).
    assert {"torch_bf16_eager", "torch_bf16_compile"} <= set(ranker)
    assert any(name.startswith("ort_") and name.endswith("_fp32") for name in ranker)
    for engine, by_batch in ranker.items():
        assert sorted(by_batch) == sorted(batches), engine
        for batch, cell in by_batch.items():
            assert cell["pairs_per_s"] > 0 and cell["ms_per_batch"] > 0, (engine, batch, cell)
    vision = results["vision"]
    assert vision["tokens_per_image"] == results["num_tokens"]
    for cell in vision["batches"].values():
        assert cell["images_per_s"] > 0
        assert cell["tokens_per_s"] == cell["images_per_s"] * vision["tokens_per_image"]
    target = results["target"]
    assert target["pairs_per_s"] == gpu_bench.TARGET_PAIRS_PER_S and target["best"]
    assert target["status"] == "not judged (smoke sizes)"
    # The printed table names every engine and the target line.
    for engine in ranker:
        assert f"| {engine} |" in done.stdout
    assert "target ~50,000 pairs/s" in done.stdout


def test_without_cuda_the_full_run_refuses(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_bench.torch.cuda, "is_available", lambda: False)
    assert gpu_bench.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_time_budget_skips_the_remaining_cells_and_says_so():
    budget = gpu_bench.Budget(0.0)
    results: dict = {}
    gpu_bench.run_cells("x", (1, 2), lambda b: {"pairs_per_s": 1.0}, budget, None, results)
    assert results == {
        "1": {"skipped": "time budget (0 s) spent"},
        "2": {"skipped": "time budget (0 s) spent"},
    }
    assert budget.skipped == ["x @ 1", "x @ 2"]


def test_table_marks_the_target_met_or_short():
    results = {
        "device": "GPU",
        "mode": "full",
        "pair_length": 81,
        "elapsed_s": 100.0,
        "budget_s": 270.0,
        "ranker_batches": [256],
        "ranker": {"torch_bf16_eager": {"256": {"pairs_per_s": 60_000.0}}},
        "vision": {"engine": "torch_bf16_eager", "tokens_per_image": 64, "batches": {}},
        "skipped_engines": {"ort_cuda_fp32": "onnxruntime has no CUDAExecutionProvider"},
        "over_budget": ["torch_bf16_compile @ 4096"],
    }
    best = gpu_bench.best_ranker(results["ranker"])
    assert best == {"engine": "torch_bf16_eager", "batch": 256, "pairs_per_s": 60_000.0}
    assert gpu_bench.judge(best, smoke=False) == "met"
    assert gpu_bench.judge({**best, "pairs_per_s": 49_999.0}, smoke=False) == "short"
    assert gpu_bench.judge(None, smoke=False) == "short"
    results["target"] = {"pairs_per_s": 50_000, "best": best, "status": "met"}
    text = gpu_bench.table(results)
    assert "| torch_bf16_eager | 60,000 |" in text and ": met" in text
    assert "skipped ort_cuda_fp32: onnxruntime has no CUDAExecutionProvider" in text
    assert "time budget spent; not measured: torch_bf16_compile @ 4096" in text
