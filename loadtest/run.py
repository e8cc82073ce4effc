"""``make loadtest``: start the embedded Triton, run a bounded headless locust load, stop all.

Writes locust's CSV files and HTML report under ``--out`` (default ``build/loadtest``).
Every request goes to 127.0.0.1 only, and the run ends after ``--run-time``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from edje_client.server import TritonServer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model-repository", default="build/model_repository")
    p.add_argument("--users", type=int, default=8, help="concurrent locust users (default 8)")
    p.add_argument("--spawn-rate", type=float, default=8.0)
    p.add_argument("--run-time", default="30s", help="locust duration, e.g. 30s, 2m (default 30s)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--k", type=int, default=10, help="candidates per rank request (default 10)")
    p.add_argument("--index", action="store_true", help="also run edje_index users")
    p.add_argument("--out", default="build/loadtest")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the server too

    repo = Path(args.model_repository)
    if not (repo / "edje_manifest.json").is_file():
        print(f"loadtest: no model repository at {repo}; run `make repo` first", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "EDJE_PROTOCOL": args.protocol,
        "EDJE_K": str(args.k),
    }
    locustfile = Path(__file__).with_name("locustfile.py")
    with TritonServer(
        repo, http_port=0, grpc_port=0, metrics_port=0, log_file=out / "tritonserver.log"
    ) as server:
        command = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(locustfile),
            "--headless",
            "--host",
            server.url(args.protocol),
            "--users",
            str(args.users),
            "--spawn-rate",
            str(args.spawn_rate),
            "--run-time",
            args.run_time,
            "--csv",
            str(out / "edje"),
            "--html",
            str(out / "report.html"),
            "--only-summary",
            "--stop-timeout",
            "10",
            "RankUser",
            *(["IndexUser"] if args.index else []),
        ]
        print("running:", " ".join(command), flush=True)
        code = subprocess.run(command, env=env).returncode
    print(f"locust reports in {out}/ (edje_stats.csv, report.html)")
    return code


if __name__ == "__main__":
    sys.exit(main())
