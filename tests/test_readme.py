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


def test_python_api_example(triton_server, tmp_path, monkeypatch, capsys):
    from tests.images import encode, noise

    (block,) = [b for b in _blocks("python") if "EDJEClient(" in b]
    (tmp_path / "photos").mkdir()
    for i in range(6):
        (tmp_path / "photos" / f"{i}.png").write_bytes(encode(noise(40, 30, seed=i)))
    monkeypatch.chdir(tmp_path)
    code = block.replace("127.0.0.1:8001", triton_server.grpc_url)
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len([line for line in lines if "(document" in line]) == 3
    assert sum(line.split()[0].endswith(".png") for line in lines) == 5  # the search hits
    from edje_client.collection import ImageCollection

    assert len(ImageCollection(tmp_path / "store", readonly=True)) == 6
