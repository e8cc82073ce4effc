"""The serving sweep's rule and report (``edje.tools.bench_serving``) on a synthetic results dict:
no server runs here. The rule: best pairs/s at the most clients and largest K among the settings
whose p99 at one client and the smallest K stays within 1.5x of the best p99 there."""

from __future__ import annotations

import pytest

from edje.tools.bench_serving import PHASES, STAT_MODELS, label, markdown_lines, pick_defaults


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
