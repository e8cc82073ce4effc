"""The search page in a real headless Chromium, against the API, Triton and the shipped default.

A query whose answer is known: a held-out caption of the synthetic world that the first stage
gets wrong and EDJE's re-ranking gets right (found with the client's own ``search``). The page
loaded at ``/?q=<caption>`` must show the true image first in the re-ranked column and the first
stage's wrong favourite first in the other, with scores and timings; a screenshot goes to
``build/page/search.png`` for a person to look at.
"""

from __future__ import annotations

import html.parser
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from edje.build_repo import build_repository, default_source
from edje.synthetic import write_karpathy
from edje_client import EDJEClient
from edje_client.cli import main as edje_main
from edje_client.collection import ImageCollection
from edje_client.evaluation import KarpathyDataset
from edje_client.search import search
from edje_client.server import TritonServer
from tests.api_support import running_api, settings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
SCREENSHOT = Path(__file__).resolve().parents[1] / "build" / "page" / "search.png"
K = 8


class Tiles(html.parser.HTMLParser):
    """The ``data-id`` of every tile, per column (``first`` and ``edje``)."""

    def __init__(self) -> None:
        super().__init__()
        self.column: str | None = None
        self.tiles: dict[str, list[str]] = {"first": [], "edje": []}
        self.state = ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "ol" and attrs.get("id") in self.tiles:
            self.column = attrs["id"]
        elif tag == "li" and self.column and "data-id" in attrs:
            self.tiles[self.column].append(attrs["data-id"])
        elif tag == "body":
            self.state = attrs.get("data-state", "")

    def handle_endtag(self, tag):
        if tag == "ol":
            self.column = None


def chromium(profile: Path, *args: str, timeout: float = 90) -> str:
    """Run headless Chromium with a fresh profile; return its stdout."""
    command = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def default_stack(tmp_path_factory):
    """Triton on the shipped default model, a synthetic gallery indexed into a collection."""
    root = tmp_path_factory.mktemp("page")
    repo = build_repository(default_source(root / "source"), root / "repo")
    dataset_path = write_karpathy(root / "data", "test", seed=0, max_scenes=60)
    dataset = KarpathyDataset.load(dataset_path)
    collection_path = root / "collection"
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0) as server:
        args = ["index", str(dataset_path.parent / "images"), "--collection", str(collection_path)]
        assert edje_main([*args, "--url", server.grpc_url]) == 0
        yield server, dataset, collection_path


def fixed_query(server, dataset, collection_path) -> tuple[str, str, str]:
    """(caption, true image id, first stage's wrong top id) of a query re-ranking fixes."""
    collection = ImageCollection(collection_path, readonly=True)
    with EDJEClient(server.grpc_url) as client:
        for caption, image in zip(dataset.captions, dataset.caption_image, strict=True):
            truth = dataset.images[image].name
            response = search(client, collection, caption, k=K)
            first = min(response.hits, key=lambda h: h.first_stage_rank).id
            if response.hits[0].id == truth and first != truth:
                return caption, truth, first
    raise AssertionError("no held-out query that re-ranking fixes in this gallery")


def test_page_shows_the_reranked_answer(default_stack, tmp_path):
    assert CHROMIUM, "chromium is missing: `make setup` installs Debian's chromium package"
    server, dataset, collection_path = default_stack
    caption, truth, first_wrong = fixed_query(server, dataset, collection_path)
    with running_api(settings(server, collection_path)) as api:
        url = f"{api.url}/?{urllib.parse.urlencode({'q': caption, 'k': K})}"
        dom = chromium(tmp_path / "p1", "--virtual-time-budget=20000", "--dump-dom", url)
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        chromium(
            tmp_path / "p2",
            "--virtual-time-budget=20000",
            "--window-size=1280,900",
            f"--screenshot={SCREENSHOT}",
            url,
        )
    tiles = Tiles()
    tiles.feed(dom)
    assert tiles.state == "done", dom[-2000:]
    assert tiles.tiles["edje"][0] == truth, (caption, tiles.tiles)
    assert tiles.tiles["first"][0] == first_wrong != truth
    assert sorted(tiles.tiles["edje"]) == sorted(tiles.tiles["first"])
    assert len(tiles.tiles["edje"]) == K
    assert "EDJE logit" in dom and "first stage #" in dom and "total" in dom
    assert SCREENSHOT.stat().st_size > 10_000
