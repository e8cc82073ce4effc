"""The serving sweep's rule and report (``edje.tools.bench_serving``) on a synthetic results dict,
and one smoke run of the whole sweep through ``make bench``'s section on a real server. The rule:
best pairs/s at the most clients and largest K among the settings whose p99 at one client and the
smallest K stays within 1.5x of the best p99 there."""

from __future__ import annotations

import argparse

import pytest

from edje.build_repo import RepoSettings
from edje.tools import bench, bench_serving
from edje.tools.bench_serving import (
    ATTEMPTS,
    OLD_DEFAULTS,
    PHASES,
    RATIO_KNOBS,
    STAT_MODELS,
    Attempt,
    headline_rows,
    label,
    markdown_lines,
    pick_defaults,
)


def setting(delay_us: int, instances: int = 1, threads: int = 1) -> dict:
    return {
        "rank_queue_delay_us": delay_us,
        "ranker_instances": instances,
        "intra_op_threads": threads,
    }


def cell(s: dict, clients: int, k: int, pairs_per_s: float, p99_ms: float) -> dict:
    return {"setting": s, "clients": clients, "k": k, "pairs_per_s": pairs_per_s} | {
        "p50_ms": p99_ms / 2,
        "p99_ms": p99_ms,
        "requests": 100,
        "rejected": 0,
    }


FAST_BUT_SLOW_ALONE = setting(20_000)  # the most pairs/s at 16 clients, p99 alone 4x the best
PICK = setting(1000, threads=2)  # p99 alone 1.4x the best, more pairs/s than QUICKEST
QUICKEST = setting(200)  # the best p99 alone


def sweep_cells() -> list[dict]:
    cells = []
    for s, alone_p99, loaded in (
        (FAST_BUT_SLOW_ALONE, 80.0, 900.0),
        (PICK, 28.0, 700.0),
        (QUICKEST, 20.0, 500.0),
    ):
        cells += [cell(s, 1, 10, 400.0, alone_p99), cell(s, 1, 64, 450.0, 3 * alone_p99)]
        cells += [cell(s, 16, 10, 0.8 * loaded, 300.0), cell(s, 16, 64, loaded, 1500.0)]
    return cells


def ratio_row(name: str, s: dict, ratio10: float, ratio64: float) -> dict:
    parts = {m: {p: 0.5 for p in (*PHASES, "total")} for m in STAT_MODELS}
    by_k = {
        str(k): {
            "k": k,
            "raw_ms": 10.0 * ratio,
            "served_ms": 10.0,
            "ratio": ratio,
            "outside_models_ms": 1.0,
            "breakdown": parts,
            "rounds": 50,
            "pair_length": 27,
        }
        for k, ratio in ((10, ratio10), (64, ratio64))
    }
    return {
        "name": name,
        "expected": "-",
        "setting": s,
        "label": label(s),
        "spinning": True,
        "by_k": by_k,
    }


def test_rule_skips_the_fastest_setting_whose_lone_p99_is_too_high():
    pick = pick_defaults({"sweep": {"cells": sweep_cells()}})
    assert pick["choice"] == PICK
    ev = pick["evidence"]
    assert ev["chosen"] == label(PICK) and ev["pairs_per_s"] == 700.0
    assert ev["best_p99_ms"] == 20.0 and ev["p99_slack"] == 1.5
    assert set(ev["eligible"]) == {label(PICK), label(QUICKEST)}
    assert ev["fastest"]["setting"] == label(FAST_BUT_SLOW_ALONE)
    assert "16 clients, K=64" in pick["rule"] and "1 client(s), K=10" in pick["rule"]
    # A tighter slack leaves only the quickest setting.
    assert pick_defaults({"cells": sweep_cells()}, p99_slack=1.2)["choice"] == QUICKEST


@pytest.mark.parametrize(
    ("ratio10", "ratio64", "verdicts"),
    [(0.85, 0.97, ("met", "met")), (0.7, 0.9, ("short", "short"))],
)
def test_markdown_has_the_table_the_ratios_the_breakdown_and_the_choice(ratio10, ratio64, verdicts):
    results = {"sweep": {"seconds": 2.0, "cells": sweep_cells()}}
    results["defaults"] = pick_defaults(results)
    results["ratios"] = [ratio_row("chosen defaults", PICK, ratio10, ratio64)]
    lines = markdown_lines(results)
    text = "\n".join(lines)
    assert f"| {label(PICK)} | 16 | 64 | 700 | 750.0 | 1500.0 |" in lines
    assert sum(line.startswith(f"| {label(QUICKEST)} |") for line in lines) == 4
    assert f"{ratio10:.3f} ({verdicts[0]})" in text and f"{ratio64:.3f} ({verdicts[1]})" in text
    for model in STAT_MODELS:
        assert f"| 10 | {model} | 0.50 | 0.50 | 0.50 | 0.50 | 0.50 |" in lines
    assert f"Choice: **{label(PICK)}**" in text and "`intra_op_threads=2`" in text
    assert results["defaults"]["rule"] in text


def test_attempts_are_built_on_the_chosen_or_the_shipped_settings():
    chosen = setting(5000, instances=1, threads=2)
    by_name = {a.name: a.settings(chosen) for a in ATTEMPTS}
    assert len(by_name) == len(ATTEMPTS)
    assert by_name["shipped defaults"] == RepoSettings()
    assert {k: getattr(by_name["old defaults"], k) for k in RATIO_KNOBS} == OLD_DEFAULTS
    assert {k: getattr(by_name["chosen defaults"], k) for k in chosen} == chosen
    # The tokenizer's delay shipped (0) vs the ranker's, as it was shared before.
    assert by_name["chosen defaults"].tokenizer_queue_delay_us == 0
    assert by_name["tokenizer delay = ranker's"].tokenizer_queue_delay_us == 5000
    assert by_name["no ORT spin-wait"].allow_spinning == 0
    assert by_name["2 ORT threads, no spin-wait"].intra_op_threads == 2


def test_report_marks_repeats_headlines_and_the_shipped_defaults():
    results = {"sweep": {"seconds": 1.0, "cells": sweep_cells()}}
    results["defaults"] = pick_defaults(results)
    shipped = ratio_row("shipped defaults", QUICKEST, 0.79, 0.96)
    results["ratios"] = [shipped, ratio_row("chosen defaults", PICK, 0.9, 0.9)]
    results["ratios"][1]["same_as"] = "shipped defaults"
    results["shipped"] = QUICKEST | {"tokenizer_queue_delay_us": 0, "allow_spinning": 1}
    text = "\n".join(markdown_lines(results, "8. Serving"))
    assert text.startswith("## 8. Serving\n") and "(the settings of shipped defaults)" in text
    assert "### Where the time goes (shipped defaults, one client)" in text
    assert "they differ from the choice in `rank_queue_delay_us=200`, `intra_op_threads=1`." in text
    results["shipped"] |= PICK
    assert "`allow_spinning=1`; they match it." in "\n".join(markdown_lines(results))
    rows = headline_rows(results)
    assert len(rows) == 2 and "K=10 (shipped defaults" in rows[0]
    assert rows[0].endswith("| 0.790x | >= 0.8x | short |")
    assert rows[1].endswith("| 0.960x | >= 0.95x | met |")


def _plan(**flags) -> str:
    return bench.serving_plan(argparse.Namespace(**{"full_sweep": False, "quick": False} | flags))


def test_bench_runs_the_bench_plan_unless_asked():
    assert (_plan(), _plan(quick=True), _plan(full_sweep=True)) == ("bench", "quick", "full")
    full, short = bench_serving.PLANS["full"], bench_serving.PLANS["bench"]
    assert {k: full[k] for k in bench_serving.GRID} == {k: short[k] for k in bench_serving.GRID}
    assert short["seconds"] < full["seconds"] and short["ratio_seconds"] < full["ratio_seconds"]


def test_make_bench_section_smoke(tiny_source, tmp_path, monkeypatch):
    """``make bench``'s section 7 on a one-setting grid with short cells: a real build, server,
    load and served/raw measurement per attempt, then its performance.md lines."""
    tiny = {"delays_us": (200,), "instances": (1,), "threads": (1,), "clients": (1,)}
    tiny |= {"ks": (10, 64), "seconds": 0.3, "ratio_seconds": 0.1}
    monkeypatch.setitem(bench_serving.PLANS, "quick", tiny)
    attempts = (ATTEMPTS[0], Attempt("shipped again", "-", absolute=True))  # one build each
    results = bench.section_serving(tiny_source, tmp_path, "quick", attempts=attempts)
    assert results["command"] == "python -m edje.tools.bench --quick"
    assert results["shipped"] == {k: getattr(RepoSettings(), k) for k in RATIO_KNOBS}
    cells = results["sweep"]["cells"]
    assert [(c["clients"], c["k"]) for c in cells] == [(1, 10), (1, 64)]
    assert all(c["requests"] > 0 and c["pairs_per_s"] > 0 and c["rejected"] == 0 for c in cells)
    assert results["defaults"]["choice"] == setting(200)
    shipped, again = results["ratios"]  # the repeat is not built or measured again
    assert again["same_as"] == "shipped defaults" and again["by_k"] is shipped["by_k"]
    assert shipped["setting"] == results["shipped"] and shipped["spinning"]
    for k in ("10", "64"):
        r = shipped["by_k"][k]
        assert r["rounds"] >= 10 and r["ratio"] > 0 and r["raw_ms"] > 0
        assert r["breakdown"]["edje_ranker"]["total"] > 0
    lines = markdown_lines(results, "8. Serving defaults, by measurement")
    assert lines[0] == "## 8. Serving defaults, by measurement"
    assert sum(line.startswith(f"| {label(setting(200))} | 1 |") for line in lines) == 2
    assert len(headline_rows(results)) == 2
