"""index_with_ray on a local 2-CPU Ray: through the real Triton server and in-process.

Both paths must store every good image exactly once, with the tokens and embeddings of the
single-process path (``EDJEClient.index``), report the corrupt files by id, and skip everything
on a second run. Every test is bounded: Ray Data's own stall timeouts are lowered, and a
faulthandler watchdog ends the process (with every thread's traceback) if a test still hangs.
"""

from __future__ import annotations

import faulthandler
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import ray

from edje_client import EDJEClient, distributed
from edje_client.cli import find_images, main
from edje_client.collection import ImageCollection
from edje_client.distributed import index_with_ray, list_images

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

TEST_TIMEOUT_S = 120  # per test; the whole file takes about a minute on 2 busy cores
CORRUPT = {"bad/garbage.jpg": b"this is not an image", "bad/truncated.png": None}
FORMATS = ("PNG", "JPEG", "WEBP", "BMP")


@pytest.fixture(autouse=True)
def watchdog(monkeypatch):
    """Fail a stalled pipeline in a minute; kill the process if a test runs past its bound."""
    monkeypatch.setattr(distributed, "ACTOR_START_TIMEOUT_S", 60)
    monkeypatch.setattr(distributed, "NO_PROGRESS_TIMEOUT_S", 60)
    faulthandler.dump_traceback_later(TEST_TIMEOUT_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray on 2 CPUs for this module, shut down after it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """22 synthetic scenes in nested folders, 2 corrupt files and a non-image; the root."""
    from edje.synthetic import all_scenes, render

    root = tmp_path_factory.mktemp("images")
    rng = random.Random(0)
    scenes = all_scenes()
    good = []
    for n in range(22):
        fmt = FORMATS[n % len(FORMATS)]
        suffix = {"JPEG": ".jpg"}.get(fmt, "." + fmt.lower())
        name = f"{'ab'[n % 2]}/{n // 8}/scene_{n:02d}" + (suffix.upper() if n == 5 else suffix)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        render(scenes[rng.randrange(len(scenes))], rng).save(path, fmt)
        good.append(name)
    png = (root / good[0]).read_bytes()
    for name, data in CORRUPT.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(png[:60] if data is None else data)
    (root / "a" / "notes.txt").write_text("not listed")
    return root, sorted(good)


@pytest.fixture(scope="module")
def reference(images, triton_server):
    """``{id: (tokens, embedding)}`` from the single-process path, EDJEClient.index."""
    root, good = images
    with EDJEClient(triton_server.grpc_url) as client:
        result = client.index([root / i for i in good])
    return {i: (result.tokens[n], result.embeddings[n]) for n, i in enumerate(good)}


def _check(collection_dir, report, good, reference):
    assert report.indexed == len(good) and report.skipped == 0
    assert sorted(i for i, _ in report.failures) == sorted(CORRUPT)
    assert all("cannot decode image" in message for _, message in report.failures)
    with ImageCollection(collection_dir, readonly=True) as collection:
        ids = collection.ids()
        assert len(ids) == len(good) == len(set(ids)) and set(ids) == set(good)
        rows = np.arange(len(ids))
        tokens, embeddings = collection.tokens(rows), collection.embeddings()
        paths = [m["path"] for m in collection.metadata(rows)]
    want_tokens = np.stack([reference[i][0] for i in ids]).astype(np.float32)
    want_embeddings = np.stack([reference[i][1] for i in ids])
    np.testing.assert_allclose(tokens.astype(np.float32), want_tokens, rtol=0, atol=1e-3)
    np.testing.assert_allclose(embeddings, want_embeddings, rtol=0, atol=1e-5)
    assert all(p.endswith(i) for p, i in zip(paths, ids, strict=True))


def _rerun_skips_everything(run, good):
    again = run()
    assert (again.indexed, again.skipped) == (0, len(good))
    assert sorted(i for i, _ in again.failures) == sorted(CORRUPT)  # tried again, still bad


def test_listing_names_images_as_edje_index_does(images):
    root, good = images
    listed = list_images(str(root))
    assert [i for i, _ in listed] == sorted([*good, *CORRUPT])  # any case of suffix, no .txt
    assert [i for i, _ in listed] == sorted(i for i, _ in find_images([str(root)])[0])
    assert all(location == str(root / i) for i, location in listed)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        list_images(str(root / "missing"))


def test_through_triton(local_ray, images, triton_server, reference, tmp_path):
    root, good = images
    url = triton_server.grpc_url

    def run():
        return index_with_ray(
            str(root),
            str(tmp_path / "c"),
            urls=[url, url],
            batch_size=8,
            workers=2,
            progress=False,
        )

    _check(tmp_path / "c", run(), good, reference)
    _rerun_skips_everything(run, good)


def test_in_process_without_a_server(local_ray, images, repo_dir, reference, tmp_path):
    root, good = images

    def run():
        return index_with_ray(
            str(root),
            str(tmp_path / "c"),
            urls=None,
            repository=str(repo_dir),
            batch_size=8,
            workers=2,
            progress=False,
        )

    _check(tmp_path / "c", run(), good, reference)
    _rerun_skips_everything(run, good)


def test_cli_ray_reports_rejected_images_and_exits_1(local_ray, images, repo_dir, tmp_path, capsys):
    root, good = images
    args = ["index", str(root), "--collection", str(tmp_path / "c"), "--ray"]
    assert main([*args, "--repository", str(repo_dir), "--workers", "2"]) == 1
    captured = capsys.readouterr()
    assert f"indexed {len(good)} images" in captured.out and "2 rejected" in captured.out
    assert all(f"{name}: cannot decode image" in captured.err for name in CORRUPT)
    assert len(ImageCollection(tmp_path / "c", readonly=True)) == len(good)
    assert main([*args, "--repository", str(repo_dir), "--url", "127.0.0.1:1"]) == 2


def test_in_process_encoder_imports_neither_torch_nor_edje(images, repo_dir):
    root, good = images
    probe = (
        "import json, sys\n"
        "from edje_client.distributed import _LocalEncoder\n"
        f"encoder = _LocalEncoder({str(repo_dir)!r}, 1)\n"
        f"ids, tokens, _, failures = encoder.encode([('ok', open({str(root / good[0])!r}, "
        "'rb').read()), ('bad', b'')])\n"
        "print(json.dumps([ids, list(tokens.shape), failures,\n"
        "    sorted(m for m in ('torch', 'edje', 'transformers') if m in sys.modules)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    ids, shape, failures, imported = json.loads(out.stdout.splitlines()[-1])
    assert ids == ["ok"] and shape == [1, 64, 384] and imported == []
    assert failures == [["bad", "empty image payload (0 bytes)"]]


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        index_with_ray(str(tmp_path), str(tmp_path / "c"), urls=None)
    with pytest.raises(ValueError, match="at least 1"):
        index_with_ray(str(tmp_path), str(tmp_path / "c"), urls=["x:1"], workers=0)
