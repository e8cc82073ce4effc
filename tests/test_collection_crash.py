"""ImageCollection under SIGKILL, and the disk use of many small appends.

A child process appends batches and reports each one after ``add`` returns; the parent kills
it at a random moment and checks that every reported batch survived, whole and in order, that
at most the one interrupted batch is committed without having been reported, and that every
row is bit-exact. The orphan data files that killed writers leave are counted and
``optimize()`` must remove them without harming the collection.
"""

from __future__ import annotations

import inspect
import os
import re
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from edje_client.collection import ImageCollection, write_fragments

Q, D, E = 4, 8, 16
KILLS = 25
ID = re.compile(r"c(\d+)-b(\d+)-(\d+)of(\d+)")


def entry(image_id: str) -> tuple[np.ndarray, np.ndarray]:
    """The tokens and embedding of ``image_id``, derived from it (seeded by its crc32)."""
    rng = np.random.default_rng(zlib.crc32(image_id.encode()))
    tokens = (rng.standard_normal((Q, D)) * 4).astype(np.float16)
    return tokens, rng.standard_normal(E).astype(np.float32)


def add(collection: ImageCollection, ids: list[str]) -> None:
    tokens, embeddings = zip(*(entry(i) for i in ids), strict=True)
    collection.add(ids, np.stack(tokens), np.stack(embeddings))


CHILD = f"""
import sys, zlib
import numpy as np
from edje_client.collection import ImageCollection
Q, D, E = {Q}, {D}, {E}
{inspect.getsource(entry)}
path, child, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
collection = ImageCollection(path)
rng = np.random.default_rng(child)
print("READY", flush=True)
batch = 0
while limit == 0 or batch < limit:
    size = int(rng.integers(1, 17))
    ids = [f"c{{child}}-b{{batch}}-{{j}}of{{size}}" for j in range(size)]
    tokens, embeddings = zip(*(entry(i) for i in ids))
    collection.add(ids, np.stack(tokens), np.stack(embeddings))
    print(" ".join(ids), flush=True)
    batch += 1
"""


def run_child(path: Path, child: int, log: Path, kill_after: float | None, limit: int = 0):
    """Run one appending child; kill it ``kill_after`` s after READY (None: let it finish).

    Returns the batches it reported (complete lines only), in order.
    """
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(child), str(limit)],
            stdout=subprocess.PIPE,
            stderr=err,
            bufsize=0,  # unbuffered: readline must not read ahead past READY, or
            # communicate() (which reads the raw pipe) would miss the batches it swallowed
        )
        try:
            assert proc.stdout.readline() == b"READY\n", log.read_text()
            if kill_after is None:
                out, _ = proc.communicate(timeout=120)
                assert proc.returncode == 0, log.read_text()
            else:
                time.sleep(kill_after)
                os.kill(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate(timeout=60)
                assert proc.returncode == -signal.SIGKILL, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = out.decode().split("\n")[:-1]  # a torn last line is unreported
    return [line.split() for line in lines]


def check(path: Path, seed: list[str], reported: list[tuple[int, list[list[str]]]]) -> int:
    """Assert the collection is exactly: ``seed``, then per child its reported batches and at
    most one unreported (interrupted but committed) batch after them; every batch whole and
    every row bit-exact. Returns the number of unreported batches."""
    c = ImageCollection(path, readonly=True)
    ids = c.ids()
    assert len(set(ids)) == len(ids), "duplicate ids"
    assert ids[: len(seed)] == seed
    groups: list[tuple[tuple[int, int], list[str]]] = []  # consecutive rows of one batch
    for image_id in ids[len(seed) :]:
        child, batch, _, _ = map(int, ID.fullmatch(image_id).groups())
        if groups and groups[-1][0] == (child, batch):
            groups[-1][1].append(image_id)
        else:
            groups.append(((child, batch), [image_id]))
    for (child, batch), members in groups:  # no torn batch: all of it, in order
        size = int(ID.fullmatch(members[0]).group(4))
        assert members == [f"c{child}-b{batch}-{j}of{size}" for j in range(size)], members
    pos = unreported = 0
    for child, batches in reported:
        for batch, members in enumerate(batches):
            assert pos < len(groups), f"reported batch c{child}-b{batch} is missing"
            assert groups[pos] == ((child, batch), members), (groups[pos], members)
            pos += 1
        if pos < len(groups) and groups[pos][0] == (child, len(batches)):
            unreported += 1  # killed after the commit, before the print
            pos += 1
    assert pos == len(groups), f"unexpected batches {groups[pos:][:3]}"
    want_tokens, want_embeddings = zip(*(entry(i) for i in ids), strict=True)
    rows = np.arange(len(ids))
    np.testing.assert_array_equal(
        c.tokens(rows).view(np.uint16), np.stack(want_tokens).view(np.uint16)
    )
    np.testing.assert_array_equal(
        c.embeddings().view(np.uint32), np.stack(want_embeddings).view(np.uint32)
    )
    assert c.rows_of([ids[-1]]).tolist() == [len(ids) - 1]
    return unreported


def orphan_files(path: Path) -> set[str]:
    """Files under ``data/`` that the latest manifest does not reference."""
    dataset = ImageCollection(path, readonly=True).dataset
    referenced = {f.path for fragment in dataset.get_fragments() for f in fragment.data_files()}
    return {p.name for p in (path / "data").iterdir()} - referenced


def test_sigkill_mid_append_loses_nothing_committed(tmp_path):
    path = tmp_path / "c"
    seed = [f"seed-{k}" for k in range(5)]
    with ImageCollection(path) as c:  # created (and its id index built) before any kill
        add(c, seed)
    rng = np.random.default_rng(2024)
    reported: list[tuple[int, list[list[str]]]] = []
    unreported = 0
    started = time.perf_counter()
    for child in range(KILLS):
        batches = run_child(path, child, tmp_path / f"child{child}.log", rng.uniform(0, 0.3))
        reported.append((child, batches))
        unreported = check(path, seed, reported)
    kills_seconds = time.perf_counter() - started
    after_first_kill = sum(len(b) for _, b in reported[1:])
    assert after_first_kill > 0, "no child appended anything after a kill"
    rows = len(ImageCollection(path, readonly=True))
    orphans = orphan_files(path)
    planted = not orphans
    if planted:  # no kill landed between a data write and its commit: make one such writer
        write_fragments(path, ImageCollection(path, readonly=True).dataset.to_table(limit=2))
        orphans = orphan_files(path)
    before = ImageCollection(path, readonly=True).info()
    print(
        f"\n{KILLS} kills in {kills_seconds:.1f} s: {rows} rows, "
        f"{sum(len(b) for _, b in reported)} reported batches, {unreported} committed but "
        f"unreported, {len(orphans)} orphan data files"
        + (" (planted: no kill left one)" if planted else "")
        + f", {before['fragments']} fragments, {before['versions']} versions"
    )
    assert len(orphans) >= 1

    report = ImageCollection(path).optimize()
    left = orphan_files(path)
    after = ImageCollection(path, readonly=True).info()
    print(
        f"optimize: {report}; orphans {len(orphans)} -> {len(left)}, fragments "
        f"{before['fragments']} -> {after['fragments']}, bytes {before['size_bytes']} -> "
        f"{after['size_bytes']}"
    )
    assert not left and after["rows"] == rows
    assert not orphans & {p.name for p in (path / "data").iterdir()}
    assert check(path, seed, reported) == unreported

    batches = run_child(path, KILLS, tmp_path / "last.log", kill_after=None, limit=3)
    assert len(batches) == 3
    reported.append((KILLS, batches))
    assert check(path, seed, reported) == unreported


def test_many_small_appends_then_optimize_stay_bounded(tmp_path):
    ids = [f"img{k}" for k in range(600)]
    many = ImageCollection(tmp_path / "many")
    for s in range(0, len(ids), 3):
        add(many, ids[s : s + 3])
    before, fragments_before = many.size_bytes(), len(many.dataset.get_fragments())
    many.optimize()
    after, fragments_after = many.size_bytes(), len(many.dataset.get_fragments())
    one = ImageCollection(tmp_path / "one")
    add(one, ids)
    single = one.size_bytes()
    print(
        f"\n200 appends of 3 rows: {before} bytes in {fragments_before} fragments; after "
        f"optimize {after} bytes in {fragments_after} fragments ({after / single:.2f}x); "
        f"one add of 600 rows: {single} bytes"
    )
    assert after < 2 * single
    assert fragments_after <= 2
    c = ImageCollection(tmp_path / "many", readonly=True)
    assert c.ids() == ids
    want_tokens, want_embeddings = zip(*(entry(i) for i in ids), strict=True)
    np.testing.assert_array_equal(
        c.tokens(np.arange(600)).view(np.uint16), np.stack(want_tokens).view(np.uint16)
    )
    np.testing.assert_array_equal(
        c.embeddings().view(np.uint32), np.stack(want_embeddings).view(np.uint32)
    )
    assert c.rows_of(["img599", "img0"]).tolist() == [599, 0]
