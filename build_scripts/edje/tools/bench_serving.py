"""Serving defaults chosen by measurement: a sweep of the ranker's Triton settings (issue 19, 4).

1. :func:`sweep`: ``rank_queue_delay_us`` {0.2, 1, 5, 20 ms} x ``ranker_instances`` {1, 2} x
   ``intra_op_threads`` {1, 2}, each built (python runtime, default model) and served once, at
   1, 4 and 16 closed-loop gRPC clients (``bench._load``) and K = 10 and 64: pairs/s, p50, p99.
2. :func:`ratios`: one client, Triton against ONNX Runtime in this process (same graph, trimmed
   pairs, session options), one call each per round (``bench.timed_rounds``), median of the
   rounds' ratios (targets >= 0.8 at K=10, >= 0.95 at K=64), Triton's per-model statistics, for
   the shipped, the old and the chosen defaults and each variant around them (:data:`ATTEMPTS`).
3. :func:`pick_defaults` by a stated rule; :func:`markdown_lines` for docs/performance.md.

:func:`run` does all three with one of :data:`PLANS`: ``full`` (the issue's grid, 2 s cells: the
record behind ``RepoSettings``' defaults, docs/serving.json), ``bench`` (the same grid, shorter
cells: ``make bench``'s section) or ``quick``. The machine is shared: compare the ratios, taken
call by call in one loop; the sweep's absolute numbers move with the other load, and its load
generator runs on the same cores.

    python -m edje.tools.bench_serving --out docs/serving.json [--plan bench|quick]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edje.build_repo import RepoSettings, build_repository

log = logging.getLogger("edje.tools.bench_serving")

KNOBS = ("rank_queue_delay_us", "ranker_instances", "intra_op_threads")  # swept
# Also set per attempt of the served/raw ratio (the tokenizer's delay, ORT's spin-waiting).
RATIO_KNOBS = (*KNOBS, "tokenizer_queue_delay_us", "allow_spinning")
FULL = {"delays_us": (200, 1000, 5000, 20_000), "instances": (1, 2), "threads": (1, 2)}
FULL |= {"clients": (1, 4, 16), "ks": (10, 64), "seconds": 2.0, "ratio_seconds": 8.0}
# make bench: the whole grid, shorter cells (about 7 minutes on 2 cores; FULL about 11).
BENCH = FULL | {"seconds": 1.0, "ratio_seconds": 3.0}
QUICK = FULL | {"delays_us": (200, 5000), "instances": (1,), "clients": (1, 16)}
QUICK |= {"seconds": 1.0, "ratio_seconds": 2.0}
PLANS = {"full": FULL, "bench": BENCH, "quick": QUICK}
GRID = ("delays_us", "instances", "threads", "clients", "ks")
TARGETS = {10: 0.8, 64: 0.95}  # served / raw ONNX Runtime, one client
STAT_MODELS = ("edje_rank", "edje_tokenizer", "edje_ranker")
PHASES = ("queue", "compute_input", "compute_infer", "compute_output")
STEPS = ("success", *PHASES)
SWEEP_HEADER = ("setting", "clients", "K", "pairs/s", "p50 ms", "p99 ms")
QUERY = "a red circle left of a blue square"  # bench.rank_request's text


def label(setting: dict) -> str:
    """``delay 1 ms, 2 inst, 1 thr`` for a setting (a dict over :data:`KNOBS`)."""
    delay, instances, threads = (setting[k] for k in KNOBS)
    return f"delay {delay / 1000:g} ms, {instances} inst, {threads} thr"


def sweep_cells(c: dict) -> list[str]:
    """One row of the sweep table (and the progress log's line)."""
    values = [c["clients"], c["k"], f"{c['pairs_per_s']:.0f}", f"{c['p50_ms']:.1f}"]
    return [label(c["setting"]), *map(str, values), f"{c['p99_ms']:.1f}"]


def long_label(setting: dict) -> str:
    """:func:`label` plus the tokenizer's delay and, when off, ORT's spin-waiting."""
    text = f"{label(setting)}, tokenizer {setting['tokenizer_queue_delay_us'] / 1000:g} ms"
    return text + ("" if setting["allow_spinning"] else ", no spin-wait")


@contextlib.contextmanager
def serving(source, work: Path, settings: RepoSettings) -> Iterator[tuple[Path, object]]:
    """Build the repository at ``work/repo``, serve it: (repo, server)."""
    from edje_client.server import TritonServer

    repo = build_repository(source, work / "repo", settings)
    log_file = work / "tritonserver.log"
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, log_file=log_file) as server:
        yield repo, server


def shape(source) -> tuple[int, int]:
    """(Q, D): compressed tokens per image and their width."""
    ranking, _ = source.build_ranking_model()
    return ranking.num_compressed_tokens, ranking.language_model.config.hidden_size


def sweep(source, work: Path, seconds: float = 2.0, grid: dict | None = None) -> dict:
    """Every setting of ``delays_us`` x ``instances`` x ``threads``, served once, at every
    (``clients``, ``ks``): pairs/s, p50, p99. ``grid`` holds those five sequences (default:
    :data:`FULL`'s); each cell runs ``seconds`` after a warm-up (4 clients, K = 64, <= 1 s)."""
    from edje.tools.bench import _load, rank_request

    grid = {k: tuple((grid or FULL)[k]) for k in GRID}
    q, d = shape(source)
    cells = []
    for values in itertools.product(*(grid[k] for k in GRID[:3])):
        setting = dict(zip(KNOBS, values, strict=True))
        with serving(source, work, RepoSettings(**setting)) as (_, server):
            _load(server.grpc_url, "grpc", rank_request(64, q, d), 4, min(seconds, 1.0))
            for n, k in itertools.product(grid["clients"], grid["ks"]):
                cell = _load(server.grpc_url, "grpc", rank_request(k, q, d), n, seconds)
                keep = {m: cell[m] for m in ("p50_ms", "p99_ms", "requests", "rejected")}
                cells.append({"setting": setting, "clients": n, "k": k, **keep})
                cells[-1]["pairs_per_s"] = cell["requests_per_s"] * k
                log.info(" | ".join(sweep_cells(cells[-1])))
    return {"grid": grid, "seconds": seconds, "q": q, "d": d, "cells": cells}


def pick_defaults(results: dict, p99_slack: float = 1.5) -> dict:
    """The best pairs/s at the most clients and largest K among the settings whose p99 at the
    fewest clients and smallest K is within ``p99_slack`` x the best there (ties: lower p99), from
    the ``cells`` of ``results["sweep"]`` (or ``results``): the rule, choice and evidence."""
    cells = results.get("sweep", results)["cells"]
    top_c, top_k = max(c["clients"] for c in cells), max(c["k"] for c in cells)
    low_c, low_k = min(c["clients"] for c in cells), min(c["k"] for c in cells)

    def at(n: int, k: int, m: str) -> dict[str, float]:
        return {label(c["setting"]): c[m] for c in cells if (c["clients"], c["k"]) == (n, k)}

    settings = {label(c["setting"]): c["setting"] for c in cells}
    p99, throughput = at(low_c, low_k, "p99_ms"), at(top_c, top_k, "pairs_per_s")
    best_p99 = min(p99.values())
    eligible = [n for n, v in p99.items() if v <= p99_slack * best_p99 and n in throughput]
    chosen = max(eligible, key=lambda n: (throughput[n], -p99[n]))
    fastest = max(throughput, key=throughput.__getitem__)
    return {
        "rule": f"the best pairs/s at {top_c} clients, K={top_k}, among the settings whose p99 at "
        f"{low_c} client(s), K={low_k} is within {p99_slack:g}x of the best p99 there",
        "choice": dict(settings[chosen]),
        "evidence": {"chosen": chosen, "pairs_per_s": throughput[chosen], "p99_ms": p99[chosen]}
        | {"best_p99_ms": best_p99, "p99_slack": p99_slack, "eligible": eligible}
        | {"fastest": {"setting": fastest, "pairs_per_s": throughput[fastest]}},
    }


@dataclass(frozen=True)
class Attempt:
    """One configuration whose served/raw ratio is measured: ``overrides`` on the chosen
    defaults (on RepoSettings() when ``absolute``), a dict or a function of those settings, and
    what it was expected to do. The raw session spin-waits when the served one does."""

    name: str
    expected: str
    overrides: dict | Callable[[RepoSettings], dict] = field(default_factory=dict)
    absolute: bool = False

    def settings(self, chosen: dict) -> RepoSettings:
        base = RepoSettings(**({} if self.absolute else chosen))
        extra = self.overrides(base) if callable(self.overrides) else self.overrides
        return RepoSettings(**asdict(base) | extra)


OLD_DEFAULTS = {  # RepoSettings before the sweep: the tokenizer shared the ranker's delay
    "rank_queue_delay_us": 1000,
    "tokenizer_queue_delay_us": 1000,
    "ranker_instances": 1,
    "intra_op_threads": 0,
    "allow_spinning": 1,
}

ATTEMPTS = (
    Attempt("shipped defaults", "reference: RepoSettings() as shipped", absolute=True),
    Attempt(
        "old defaults",
        "reference: before the sweep (ranker and tokenizer 1 ms, 1 instance, ORT's threads)",
        OLD_DEFAULTS,
        absolute=True,
    ),
    Attempt("chosen defaults", "the sweep's choice (tokenizer delay and spin-wait as shipped)"),
    Attempt(
        "tokenizer delay = ranker's",
        "as before this fix: a lone request waits the delay in the tokenizer too (it has no "
        "preferred sizes): ~1x the delay more at both K",
        lambda s: {"tokenizer_queue_delay_us": s.rank_queue_delay_us},
    ),
    Attempt(
        "ranker delay 0",
        "at K=10 a lone request waits the delay in the ranker (10 is not preferred): saves ~1x "
        "the delay at K=10; fewer merged batches under load",
        {"rank_queue_delay_us": 0},
    ),
    Attempt(
        "no ORT spin-wait",
        "no change with 1 thread (no pool to spin); idle pool threads stop taking cores from "
        "the stubs and gRPC with more",
        {"allow_spinning": 0},
    ),
    Attempt(
        "2 ORT threads, spin-wait",
        "2 instances x 2 threads on 2 cores: oversubscribed",
        {"intra_op_threads": 2, "allow_spinning": 1},
    ),
    Attempt(
        "2 ORT threads, no spin-wait",
        "faster than spin-waiting with 2 threads: idle pool threads sleep",
        {"intra_op_threads": 2, "allow_spinning": 0},
    ),
)


def trimmed_layout(tokenizer, k: int, q: int, d: int) -> dict[str, np.ndarray]:
    """The ranker's feeds for one ``rank_request(k)``: K copies of the query, each paired with
    Q image slots, cut after the longest row's last real token (as ``onnx_runner`` trims)."""
    enc = tokenizer([QUERY] * k, ["<image>" * q] * k, padding="longest", return_tensors="np")
    feeds = {n: enc[n].astype(np.int64) for n in ("input_ids", "attention_mask", "token_type_ids")}
    rng = np.random.default_rng(k)
    return feeds | {"compressed_tokens": rng.standard_normal((k, q, d)).astype(np.float16)}


def model_stats(client) -> dict[str, dict[str, tuple[int, int]]]:
    """(count, ns) of success and of every phase, per model of :data:`STAT_MODELS`."""
    out = {}
    for name in STAT_MODELS:
        reply = client.get_inference_statistics(model_name=name, as_json=True)
        stats = reply["model_stats"][0]["inference_stats"]
        out[name] = {p: (int(stats[p].get("count", 0)), int(stats[p].get("ns", 0))) for p in STEPS}
    return out


def per_request(snapshots: Sequence[dict]) -> dict[str, dict[str, list[float]]]:
    """ms of each step (success = the whole) per request, per model, from one :func:`model_stats`
    snapshot after each served request: entry i is the i-th request after the first snapshot."""
    out: dict[str, dict[str, list[float]]] = {}
    for name in STAT_MODELS:
        out[name] = {p: [] for p in STEPS}
        for a, b in itertools.pairwise(s[name] for s in snapshots):
            n = max(1, b["success"][0] - a["success"][0])
            for p in STEPS:
                out[name][p].append((b[p][1] - a[p][1]) / n / 1e6)
    return out


def served_ratio(server, session, tokenizer, k: int, q: int, d: int, seconds: float) -> dict:
    """One client: Triton ``edje_rank`` and ``session`` on the same pairs, one call each per
    round (``bench.timed_rounds``) for about ``seconds``. ``ratio``: the median over rounds of
    raw / served time (each round's pair taken back to back); per-model medians of Triton's
    statistics, read after every served call (outside the timed calls)."""
    import tritonclient.grpc as grpcclient

    from edje.tools.bench import rank_request, timed_rounds

    client = grpcclient.InferenceServerClient(server.grpc_url)
    feeds = trimmed_layout(tokenizer, k, q, d)
    snapshots: list[dict] = []
    fns = {"raw": lambda: session.run(None, feeds)}
    fns["served"] = rank_request(k, q, d)(grpcclient, client)
    for _ in range(2):  # the second, warm, pass sets the number of rounds
        start = time.perf_counter()
        for fn in fns.values():
            fn()
    rounds = max(10, int(seconds / (time.perf_counter() - start)))
    fns["stats"] = lambda: snapshots.append(model_stats(client))
    times = timed_rounds(fns, rounds)
    client.close()
    med = statistics.median
    raw, served = (np.array(times[n]) * 1e3 for n in ("raw", "served"))
    steps = per_request(snapshots)
    parts = {
        m: {p: med(v[p]) for p in PHASES} | {"total": med(v["success"])} for m, v in steps.items()
    }
    out = {"k": k, "rounds": rounds, "pair_length": int(feeds["input_ids"].shape[1])}
    out |= {"raw_ms": med(raw), "served_ms": med(served), "ratio": float(np.median(raw / served))}
    out |= {"ratio_of_medians": med(raw) / med(served), "breakdown": parts}
    return out | {"outside_models_ms": float(np.median(served - steps["edje_rank"]["success"]))}


def ranker_session(repo: Path, threads: int, spinning: bool):
    """ONNX Runtime on the served graph with the served ranker's session options."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        options.add_session_config_entry(key, "1" if spinning else "0")
    path = str(repo / "edje_ranker" / "1" / "model.onnx")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def ratios(
    source, work: Path, chosen: dict, seconds: float, attempts: Sequence[Attempt] = ATTEMPTS
) -> list[dict]:
    """Served / raw at K = 10 and 64 for each attempt (built, served and measured in turn); an
    attempt whose settings an earlier one had is not measured again (``same_as``: its name)."""
    q, d = shape(source)
    tok = source.tokenizer()
    rows: list[dict] = []
    for attempt in attempts:
        settings = attempt.settings(chosen)
        setting = {n: getattr(settings, n) for n in RATIO_KNOBS}
        row = {"name": attempt.name, "expected": attempt.expected, "setting": setting}
        row |= {"label": long_label(setting), "spinning": bool(settings.allow_spinning)}
        earlier = next((r for r in rows if r["setting"] == setting and "by_k" in r), None)
        if earlier:
            rows.append(row | {"same_as": earlier["name"], "by_k": earlier["by_k"]})
            log.info("%s: the settings of %s", attempt.name, earlier["name"])
            continue
        with serving(source, work, settings) as (repo, server):
            session = ranker_session(repo, settings.intra_op_threads, row["spinning"])
            by_k = {str(k): served_ratio(server, session, tok, k, q, d, seconds) for k in TARGETS}
        rows.append(row | {"by_k": by_k})
        log.info("%s: %s", attempt.name, " ".join(ratio_cells(rows[-1])))
    return rows


def ratio_cells(row: dict) -> list[str]:
    """``served / raw ms`` and ``ratio (met|short)`` for each K of :data:`TARGETS`."""
    cells = []
    for k, target in TARGETS.items():
        r = row["by_k"][str(k)]
        verdict = "met" if r["ratio"] >= target else "short"
        cells += [f"{r['served_ms']:.1f} / {r['raw_ms']:.1f}", f"{r['ratio']:.3f} ({verdict})"]
    return cells


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A markdown table."""
    body = ("| " + " | ".join(map(str, row)) + " |" for row in rows)
    return ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header), *body, ""]


def headline_rows(results: dict) -> list[str]:
    """performance.md's headline rows: served / raw at each K of :data:`TARGETS`, for the
    shipped defaults (the first row of ``results["ratios"]`` otherwise)."""
    rows = results["ratios"]
    row = next((r for r in rows if r["name"] == "shipped defaults"), rows[0])
    lines = []
    for k, target in TARGETS.items():
        ratio = row["by_k"][str(k)]["ratio"]
        lines.append(
            f"| Triton-served / raw ONNX Runtime, one client, K={k} ({row['name']}: "
            f"{row['label']}) | {ratio:.3f}x | >= {target}x | "
            f"{'met' if ratio >= target else 'short'} |"
        )
    return lines


def markdown_lines(results: dict, title: str = "Serving defaults, by measurement") -> list[str]:
    """The section for docs/performance.md: sweep table, ratios, time breakdown, defaults."""
    s, pick, ev = results["sweep"], results["defaults"], results["defaults"]["evidence"]
    lines = [
        f"## {title}",
        "",
        f"`{results.get('command', 'python -m edje.tools.bench_serving')}` on "
        f"{results.get('machine', 'this machine')} ({results.get('date', '')}); model: "
        f"{results.get('model', '')}. Each cell: {s['seconds']:g} s of closed-loop gRPC clients "
        "(threads on the same cores as the server) after a warm-up.",
        *table(SWEEP_HEADER, map(sweep_cells, s["cells"])),
        "### Served / raw ONNX Runtime, one client",
        "",
        "Same graph, trimmed pairs and session options, one call of each per round; ms: medians; "
        "ratio: the median of the rounds' raw / served. Targets: "
        + ", ".join(f">= {t} at K={k}" for k, t in TARGETS.items()),
    ]
    header = ["attempt", "setting"]
    header += [f"K={k} {m}" for k in TARGETS for m in ("served / raw ms", "ratio")] + ["expected"]
    rows = [
        [r["name"], r["label"], *ratio_cells(r)]
        + [f"(the settings of {r['same_as']})" if "same_as" in r else r["expected"]]
        for r in results["ratios"]
    ]
    lines += table(header, rows)
    names = ("shipped defaults", "chosen defaults")
    for row in [r for r in results["ratios"] if r["name"] in names][:1]:
        lines += [
            f"### Where the time goes ({row['name']}, one client)",
            "",
            "Median ms per request, from Triton's per-model statistics read after every served "
            "call. `edje_rank` is the ensemble (its phases span its steps); compute_output is the "
            "hand-back of the responses (for the last step it includes the ensemble's reply).",
        ]
        rows = []
        for k, r in row["by_k"].items():
            for name, parts in r["breakdown"].items():
                rows.append([k, name, *(f"{parts[p]:.2f}" for p in (*PHASES, "total"))])
            outside = f"{r['outside_models_ms']:.2f}"
            rows.append(
                [k, "client-observed minus the ensemble (gRPC, client)", *[""] * 4, outside]
            )
            rows.append([k, "raw ONNX Runtime, same pairs", *[""] * 4, f"{r['raw_ms']:.2f}"])
        lines += table(("K", "model", *PHASES, "total"), rows)
    choice = ", ".join(f"`{k}={v}`" for k, v in pick["choice"].items())
    limit = ev["p99_slack"] * ev["best_p99_ms"]
    shipped = results.get("shipped")
    if shipped:
        differ = [f"`{k}={shipped[k]}`" for k, v in pick["choice"].items() if shipped[k] != v]
        verdict = f"differ from the choice in {', '.join(differ)}" if differ else "match it"
        shipped_line = [
            "",
            "Shipped defaults (`RepoSettings()`): "
            + ", ".join(f"`{k}={v}`" for k, v in shipped.items())
            + f"; they {verdict}.",
        ]
    else:
        shipped_line = []
    return lines + [
        "### Chosen defaults",
        "",
        f"Rule: {pick['rule']}.",
        "",
        f"Choice: **{ev['chosen']}** ({choice}): {ev['pairs_per_s']:.0f} pairs/s, p99 "
        f"{ev['p99_ms']:.1f} ms against the best {ev['best_p99_ms']:.1f} ms (limit {limit:.1f} "
        f"ms). Eligible: {'; '.join(ev['eligible'])}. Fastest of all: "
        f"{ev['fastest']['setting']} ({ev['fastest']['pairs_per_s']:.0f} pairs/s).",
        *shipped_line,
        "",
    ]


def run(
    source,
    work: Path,
    plan: str | dict = "full",
    seconds: float | None = None,
    ratio_seconds: float | None = None,
    attempts: Sequence[Attempt] = ATTEMPTS,
    command: str = "python -m edje.tools.bench_serving",
) -> dict:
    """The sweep, the chosen defaults and the served/raw ratios with one of :data:`PLANS` (or a
    dict of their keys); ``seconds`` / ``ratio_seconds`` override the plan's cell durations."""
    grid = PLANS[plan] if isinstance(plan, str) else plan
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    shipped = RepoSettings()
    results: dict = {
        "command": command,
        "plan": plan if isinstance(plan, str) else "custom",
        "machine": f"{os.cpu_count()} CPUs, no GPU",
        "date": time.strftime("%Y-%m-%d"),
        "model": source.description,
        "shipped": {k: getattr(shipped, k) for k in RATIO_KNOBS},
    }
    results["sweep"] = sweep(source, work, seconds or grid["seconds"], grid)
    results["defaults"] = pick_defaults(results)
    choice, ratio_seconds = results["defaults"]["choice"], ratio_seconds or grid["ratio_seconds"]
    results["ratios"] = ratios(source, work, choice, ratio_seconds, attempts)
    results["elapsed_s"] = time.perf_counter() - started
    return results


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    p.add_argument("--out", default="docs/serving.json", help="where the results JSON goes")
    p.add_argument("--work", default="build/bench_serving")
    p.add_argument(
        "--plan",
        choices=tuple(PLANS),
        default="full",
        help="full: the issue's grid, 2 s cells (about 11 min on 2 cores); bench: the same grid, "
        "1 s cells (make bench's); quick: a smaller grid",
    )
    p.add_argument("--quick", action="store_true", help="the same as --plan quick")
    p.add_argument("--seconds", type=float, help="seconds per sweep cell")
    p.add_argument("--ratio-seconds", type=float, help="seconds per served/raw measurement")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from edje.build_repo import default_source

    plan = "quick" if args.quick else args.plan
    work, out = Path(args.work), Path(args.out)
    for folder in (work, out.parent):
        folder.mkdir(parents=True, exist_ok=True)
    source = default_source(work / "src")
    command = "python -m edje.tools.bench_serving" + ("" if plan == "full" else f" --plan {plan}")
    results = run(source, work, plan, args.seconds, args.ratio_seconds, command=command)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(markdown_lines(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
