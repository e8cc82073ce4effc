"""The README's examples run as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_curl_request_to_edje_rank(triton_server, tmp_path):
    (block,) = [b for b in _blocks("sh") if "curl" in b and "edje_rank" in b]
    env = {**os.environ, "HTTP_PORT": str(triton_server.http_port)}
    out = subprocess.run(
        ["bash", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    answer = json.loads(out.stdout)
    (score,) = answer["outputs"]
    assert score["name"] == "score" and score["shape"] == [1, 1]
    assert isinstance(score["data"][0], float)
