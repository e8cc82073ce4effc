"""Index images into a collection on Ray Data: list, encode and write in parallel, commit once.

The driver lists the images under ``source`` (a local directory or an object-store prefix, via
``pyarrow.fs``) and drops the ids the collection already holds, so an interrupted run is simply
repeated. ``(id, path)`` rows stream through ``map_batches`` into ``workers`` encoder actors.
Each reads its images itself, encodes them, through Triton's ``edje_index`` (``urls``,
round-robin by actor) or in-process with a built repository's own ``edje_image.py`` and ONNX
vision adapter (``repository``; CUDA where ONNX Runtime has it, never torch), and writes Lance
fragments without committing. Only fragment metadata, ids and ``(id, message)`` failures come
back; the driver publishes all fragments as one version (what was finished is committed even
when the run fails, so a rerun resumes). A bad image never stops the job.

On a Ray cluster, set ``RAY_ADDRESS`` (KubeRay: ``ray://<head-service>:10001``, or ``auto`` on a
cluster node) and run the same call or ``edje index ... --ray``: it connects instead of starting
a local Ray. Every node needs ``edje-triton[ray]`` and must reach the source (object-store
credentials from the environment), the collection (``storage_options``) and the ``urls`` or
the ``repository`` path. Without ``RAY_ADDRESS`` a local Ray starts on this machine's CPUs and
stays up for the process (``ray.shutdown()`` stops it).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edje_client.cli import IMAGE_SUFFIXES, index_batch
from edje_client.collection import (
    CollectionError,
    CollectionMismatchError,
    CollectionSpec,
    ImageCollection,
    rows_table,
    write_fragments,
)

__all__ = ["RayIndexReport", "index_with_ray", "list_images"]

# CPUs reserved per encoder actor. Below one on purpose: Ray Data starves and hangs when the
# actors take every CPU (DESIGN.md section 7), and a Triton-backed actor mostly waits anyway.
WORKER_CPUS = 0.5
READ_THREADS = 8  # concurrent reads per actor (object stores answer each read slowly)
# Bounds on a stuck pipeline: actors that never start, or no block moving for this long.
ACTOR_START_TIMEOUT_S = 300
NO_PROGRESS_TIMEOUT_S = 900
TOKEN_OUTPUT, EMBEDDING_OUTPUT = "compressed_tokens", "image_embedding"
PATH_COLUMN = "path"  # the one metadata column written: each image's absolute path or URI


@dataclass
class RayIndexReport:
    """What :func:`index_with_ray` did: images committed, skipped as already stored, rejected
    (``(id, message)``), and the wall time in seconds."""

    indexed: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def _open_source(source: str) -> tuple[Any, str, str]:
    """``(filesystem, root path in it, prefix that makes a path a URI again)``."""
    from pyarrow import fs

    uri = source if "://" in source else str(Path(source).resolve())
    filesystem, root = fs.FileSystem.from_uri(uri)
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    return filesystem, root.rstrip("/") or root, "" if scheme == "file" else f"{scheme}://"


def list_images(source: str) -> list[tuple[str, str]]:
    """``(id, location)`` of every image under ``source``, sorted by id.

    Images are files with one of ``edje index``'s suffixes (any case), found recursively. The
    id is the path relative to ``source`` in posix form (as ``edje index DIR`` names them); the
    location is the absolute local path or the object's URI.
    """
    from pyarrow import fs

    filesystem, root, prefix = _open_source(source)
    info = filesystem.get_file_info(root)
    if info.type == fs.FileType.NotFound:
        raise FileNotFoundError(f"no such directory or object-store prefix: {source}")
    if info.type == fs.FileType.File:
        return [(PurePosixPath(root).name, prefix + root)]
    found = [
        (f.path[len(root) :].lstrip("/"), prefix + f.path)
        for f in filesystem.get_file_info(fs.FileSelector(root, recursive=True))
        if f.type == fs.FileType.File and PurePosixPath(f.path).suffix.lower() in IMAGE_SUFFIXES
    ]
    return sorted(found)


def _server_spec(client: Any, token_dtype: str = "float16") -> CollectionSpec:
    return client.spec.collection_spec(token_dtype)


def _repository_spec(repository: str, token_dtype: str = "float16") -> CollectionSpec:
    m = json.loads((Path(repository) / "edje_manifest.json").read_text())
    shape = (int(m[k]) for k in ("num_tokens", "token_width", "embedding_dim"))
    return CollectionSpec(*shape, token_dtype, m.get("model_id") or "")


Encoded = tuple[list[str], np.ndarray | None, np.ndarray | None, list[tuple[str, str]]]


class _TritonEncoder:
    """Encode through one server's ``edje_index``; a rejected batch is retried image by image."""

    def __init__(self, url: str, protocol: str, expected: CollectionSpec) -> None:
        from edje_client.client import EDJEClient

        self.client = EDJEClient(url, protocol)
        differences = expected.differences(_server_spec(self.client))
        if differences:
            raise CollectionMismatchError(f"server {url} differs: " + "; ".join(differences))

    def encode(self, items: list[tuple[str, bytes]]) -> Encoded:
        # EDJEClient.index, which index_batch calls, takes encoded bytes as well as paths.
        ids, result, failures = index_batch(self.client, items)  # type: ignore[arg-type]
        if result is None:
            return ids, None, None, failures
        return ids, result.tokens, result.embeddings, failures


class _LocalEncoder:
    """A built repository's preprocessing and ONNX vision adapter, in-process (no torch)."""

    def __init__(self, repository: str, threads: int) -> None:
        import importlib.util

        import onnxruntime as ort
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2

        repo = Path(repository)
        helper = repo / "edje_preprocess" / "1" / "edje_image.py"
        if not helper.is_file():
            raise FileNotFoundError(f"{helper} is missing: rebuild the repository")
        # As Triton does for a Python model: its folder (model.py and the _shared helpers
        # beside it) goes on sys.path, and the helper is imported by its own name.
        if str(helper.parent) not in sys.path:
            sys.path.insert(0, str(helper.parent))
        self.image = importlib.import_module("edje_image")
        text = (repo / "edje_preprocess" / "config.pbtxt").read_text()
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        config_dict = json_format.MessageToDict(config, preserving_proto_field_name=True)
        self.settings = self.image.ImageSettings.from_config(config_dict)  # the server's own
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        model = repo / "edje_vision_adapter" / "1" / "model.onnx"
        self.session = ort.InferenceSession(str(model), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def encode(self, items: list[tuple[str, bytes]]) -> Encoded:
        ids, arrays, failures = [], [], []
        for image_id, data in items:
            try:
                arrays.append(self.settings.decode(data))
                ids.append(image_id)
            except self.image.ImageError as exc:
                failures.append((image_id, str(exc)))
        if not ids:
            return ids, None, None, failures
        feeds = {self.input_name: self.settings.normalize(np.stack(arrays))}
        tokens, embeddings = self.session.run([TOKEN_OUTPUT, EMBEDDING_OUTPUT], feeds)
        return ids, tokens, embeddings, failures


@dataclass(frozen=True)
class _Job:
    """What every actor is told: where to read and write, and how to encode."""

    source: str  # absolute path or URI
    collection_uri: str
    spec: dict[str, Any]  # the collection's CollectionSpec, as a dict
    storage_options: dict[str, str] | None
    urls: list[str] | None
    protocol: str
    repository: str | None  # absolute
    workers: int
    write_path: bool  # the collection has (or will have) the path column


class _IndexWorker:
    """The actor of the Ray Data pipeline: read, encode, write fragments; return metadata."""

    def __init__(self, job: _Job, counter: Any) -> None:
        self.job, self.spec = job, CollectionSpec(**job.spec)
        self.filesystem, _, _ = _open_source(job.source)
        self.pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="edje-read")
        if job.urls:
            import ray

            turn = ray.get(counter.next.remote()) if counter is not None else 0
            url = job.urls[turn % len(job.urls)]
            self.encoder: Any = _TritonEncoder(url, job.protocol, self.spec)
        else:
            threads = max(1, (os.cpu_count() or 1) // job.workers)
            self.encoder = _LocalEncoder(str(job.repository), threads)

    def _read(self, location: str) -> bytes | str:
        path = location.split("://", 1)[1] if "://" in location else location
        try:
            with self.filesystem.open_input_stream(path) as stream:
                return stream.read()
        except OSError as exc:
            return f"cannot read image {location}: {exc}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, locations = batch["id"].tolist(), batch["path"].tolist()
        payloads = list(self.pool.map(self._read, locations))
        failures = [(i, p) for i, p in zip(ids, payloads, strict=True) if isinstance(p, str)]
        items = [(i, p) for i, p in zip(ids, payloads, strict=True) if isinstance(p, bytes)]
        done, tokens, embeddings, rejected = self.encoder.encode(items)
        fragments: list[str] = []
        if done:
            where = dict(zip(ids, locations, strict=True))
            meta = {PATH_COLUMN: [where[i] for i in done]} if self.job.write_path else None
            table = rows_table(self.spec, done, tokens, embeddings, metadata=meta)
            written = write_fragments(self.job.collection_uri, table, self.job.storage_options)
            fragments = [json.dumps(f.to_json()) for f in written]
        return {
            "fragments": np.array([json.dumps(fragments)], dtype=object),
            "ids": np.array([json.dumps(done)], dtype=object),
            "failures": np.array([json.dumps(failures + rejected)], dtype=object),
            "count": np.array([len(ids)], dtype=np.int64),
        }


def _fragment_schema(collection: ImageCollection) -> Any:
    """The schema the workers write: the collection's spec plus the ``path`` column."""
    import pyarrow as pa

    return collection.spec.schema([pa.field(PATH_COLUMN, pa.string())])


class _Counter:
    """Hands each actor its turn, for round-robin over the Triton urls."""

    def __init__(self) -> None:
        self.value = -1

    def next(self) -> int:
        self.value += 1
        return self.value


def _ensure_ray() -> Any:
    """``ray``, initialised: a cluster when ``RAY_ADDRESS`` is set, else a local one."""
    import ray

    if not ray.is_initialized():
        local = {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}
        cluster = bool(os.environ.get("RAY_ADDRESS"))  # ray.init connects to it by itself
        ray.init(log_to_driver=False, ignore_reinit_error=True, **({} if cluster else local))
    return ray


def index_with_ray(
    source: str,
    collection_uri: str,
    *,
    urls: list[str] | None,
    protocol: str = "grpc",
    repository: str | None = None,
    batch_size: int = 64,
    workers: int = 1,
    storage_options: dict | None = None,
    progress: bool = True,
    num_gpus: float | None = None,
    token_dtype: str = "float16",
) -> RayIndexReport:
    """Index every image under ``source`` into the collection at ``collection_uri`` on Ray.

    ``source``: a local directory or object-store prefix (``s3://``, ``gs://`` ...), listed
    recursively. The collection is created when missing; an existing one must hold the same
    model and shapes. ``urls``: Triton servers (``host:port``, over ``protocol``) shared
    round-robin by the actors, or ``None`` to run the built model ``repository`` in-process.
    ``batch_size`` images per actor call, ``workers`` actors; ``storage_options`` are Lance's,
    for the collection; ``progress`` shows a tqdm bar over images; ``num_gpus`` per actor
    defaults to a share of the cluster's GPUs in-process and to none with Triton;
    ``token_dtype`` is a new collection's token storage.

    Raises ``ValueError`` for neither or both of ``urls`` and ``repository`` or a bad size,
    :class:`~edje_client.collection.CollectionMismatchError` for a collection of another model
    or shape, and whatever an actor raised (after committing what was finished).
    """
    from tqdm.auto import tqdm

    started = time.monotonic()
    if batch_size < 1 or workers < 1:
        raise ValueError(f"batch_size and workers must be at least 1, got {batch_size}, {workers}")
    if (urls is None) == (repository is None) or (urls is not None and not urls):
        raise ValueError("give urls (Triton servers) or repository (in-process), exactly one")
    if urls is not None:
        from edje_client.client import EDJEClient

        with EDJEClient(urls[0], protocol) as client:
            expected = _server_spec(client, token_dtype)
    else:
        expected = _repository_spec(str(repository), token_dtype)
    collection = ImageCollection(collection_uri, spec=expected, storage_options=storage_options)
    columns = collection.metadata_columns
    if set(columns) - {PATH_COLUMN}:
        raise CollectionError(
            f"collection {collection_uri} has metadata columns {columns}; the Ray indexer writes "
            f"only {PATH_COLUMN!r} (index into it with `edje index`, or into a new collection)"
        )
    images = list_images(source)
    stored = collection.existing([i for i, _ in images])
    todo = [(i, p) for i, p in images if i not in stored]
    report = RayIndexReport(skipped=len(images) - len(todo))
    if not todo:
        report.seconds = time.monotonic() - started
        return report

    ray = _ensure_ray()
    rows = [{"id": i, "path": p} for i, p in todo]
    blocks = math.ceil(len(rows) / batch_size)
    workers = min(workers, blocks)  # an actor without a batch would only cost its start
    if num_gpus is None:
        gpus = ray.cluster_resources().get("GPU", 0) if repository else 0
        num_gpus = min(1.0, gpus / workers) if gpus else 0
    counter = ray.remote(num_cpus=0)(_Counter).remote() if urls and len(urls) > 1 else None
    job = _Job(
        source if "://" in source else str(Path(source).resolve()),
        collection_uri,
        asdict(collection.spec),
        storage_options,
        urls,
        protocol,
        str(Path(repository).resolve()) if repository else None,
        workers,
        write_path=collection.dataset is None or PATH_COLUMN in columns,
    )
    dataset = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        _IndexWorker,
        fn_constructor_kwargs={"job": job, "counter": counter},
        batch_size=batch_size,
        concurrency=workers,
        num_cpus=WORKER_CPUS,
        num_gpus=num_gpus,
        batch_format="numpy",
    )
    context = dataset.context
    context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    context.execution_no_progress_timeout_s = NO_PROGRESS_TIMEOUT_S
    context.enable_progress_bars = False

    from lance.fragment import FragmentMetadata

    fragments: list[Any] = []
    ids: list[str] = []
    bar = tqdm(total=len(todo), unit="img", desc="indexing on Ray", disable=not progress)
    try:
        for row in dataset.iter_rows():
            fragments += [FragmentMetadata.from_json(f) for f in json.loads(row["fragments"])]
            ids += json.loads(row["ids"])
            report.failures += [tuple(f) for f in json.loads(row["failures"])]
            bar.update(int(row["count"]))
    finally:
        bar.close()
        if counter is not None:
            ray.kill(counter)
        if fragments:  # also on failure: a rerun then resumes after what was finished
            collection.commit_fragments(fragments, ids, schema=_fragment_schema(collection))
            report.indexed = len(ids)
    collection.first_stage.maintain_index()
    report.seconds = time.monotonic() - started
    return report
