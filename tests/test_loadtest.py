"""The locust users run, briefly, against the real servers: requests succeed, pairs are counted.

Each run is a few seconds of headless locust in a subprocess (bounded by a timeout); the stats
CSV must show successful requests and no failures, and a ``pairs`` row for the rank users, which
is what ``make loadtest`` reports as pairs/s.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.api_support import indexed_collection, running_api, settings

ROOT = Path(__file__).resolve().parents[1]
K = 4


def run_locust(locustfile: str, host: str, users: list[str], out: Path, env: dict) -> dict:
    """Rows of locust's ``_stats.csv`` by name, after a 4-second headless run."""
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "loadtest" / locustfile),
        "--headless",
        "--host",
        host,
        "--users",
        str(len(users) * 2),
        "--spawn-rate",
        "10",
        "--run-time",
        "4s",
        "--stop-timeout",
        "5",
        "--csv",
        str(out / "run"),
        "--only-summary",
        *users,
    ]
    done = subprocess.run(
        command, env={**os.environ, **env}, capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "run_stats.csv", newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_users(triton_server, protocol, tmp_path):
    env = {"EDJE_PROTOCOL": protocol, "EDJE_K": str(K)}
    rows = run_locust(
        "locustfile.py", triton_server.url(protocol), ["RankUser", "IndexUser"], tmp_path, env
    )
    for name in (f"edje_rank K={K}", "edje_index", "pairs"):
        assert int(rows[name]["Request Count"]) > 0, (name, rows)
        assert int(rows[name]["Failure Count"]) == 0, (name, rows)
    pairs, ranks = (
        int(rows["pairs"]["Request Count"]),
        int(rows[f"edje_rank K={K}"]["Request Count"]),
    )
    assert pairs == K * ranks


def test_api_user(triton_server, tmp_path):
    collection = indexed_collection(triton_server, tmp_path, scenes=8)
    with running_api(settings(triton_server, collection)) as api:
        rows = run_locust(
            "api_locustfile.py", api.url, ["ApiRerankUser"], tmp_path, {"EDJE_K": str(K)}
        )
    assert int(rows[f"/v2/rerank K={K}"]["Request Count"]) > 0, rows
    assert int(rows[f"/v2/rerank K={K}"]["Failure Count"]) == 0, rows
    assert int(rows["pairs"]["Request Count"]) == K * int(
        rows[f"/v2/rerank K={K}"]["Request Count"]
    )
