"""The client package: EDJEClient / AsyncEDJEClient against the real server, errors, the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import io
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from edje_client import (
    APIConnectionError,
    APITimeoutError,
    AsyncEDJEClient,
    EDJEClient,
    EDJEError,
    InvalidInputError,
    ModelNotReadyError,
    RerankResult,
    ServerError,
    _core,
)
from edje_client._core import (
    Endpoint,
    RetryPolicy,
    ServerSpec,
    check_server_state,
    embed_texts_plan,
    rerank_plan,
    sigmoid,
)
from edje_client.cli import main
from edje_client.collection import ImageCollection
from edje_client.errors import LaunchError, as_edje_error
from edje_client.server import TritonServer, find_free_port

MODULES = {"http": httpclient, "grpc": grpcclient}
TEXTS = ["a red circle left of a blue square", "dog", "", "the cat sleeping on a sofa " * 4]


def png(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A small PNG of random noise."""
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def random_tokens(n: int, q: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, q, d)).astype(np.float16)


@pytest.fixture
def url(triton_server, protocol) -> str:
    return triton_server.url(protocol)


@pytest.fixture
def client(url, protocol):
    with EDJEClient(url, protocol) as c:
        yield c


@pytest.fixture
def raw(url, protocol):
    """A plain tritonclient client for reference results."""
    c = MODULES[protocol].InferenceServerClient(url)
    yield c
    c.close()


def raw_rank(raw, protocol: str, texts: list[str], tokens: np.ndarray) -> np.ndarray:
    module = MODULES[protocol]
    text = module.InferInput("text", [len(texts), 1], "BYTES")
    text.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
    toks = module.InferInput("compressed_tokens", list(tokens.shape), "FP16")
    toks.set_data_from_numpy(tokens)
    return raw.infer("edje_rank", [text, toks]).as_numpy("score")[:, 0]


# ------------------------------------------------------------------ index


def test_shapes_come_from_the_server(client, raw, protocol):
    kwargs = {"as_json": True} if protocol == "grpc" else {}
    meta = raw.get_model_metadata("edje_index", **kwargs)
    shapes = {o["name"]: [int(s) for s in o["shape"]] for o in meta["outputs"]}
    assert shapes["compressed_tokens"] == [-1, client.num_tokens, client.token_width]
    assert shapes["image_embedding"] == [-1, client.embedding_dim]


def test_index_accepts_paths_bytes_and_pil(client, tmp_path):
    data = png(1)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    pil = Image.open(io.BytesIO(data))
    result = client.index([str(path), path, data, pil])
    q, d, e = client.num_tokens, client.token_width, client.embedding_dim
    assert result.tokens.dtype == np.float16 and result.tokens.shape == (4, q, d)
    assert result.embeddings.dtype == np.float32 and result.embeddings.shape == (4, e)
    for i in range(1, 4):
        np.testing.assert_array_equal(result.tokens[i], result.tokens[0])
        np.testing.assert_array_equal(result.embeddings[i], result.embeddings[0])


def test_index_converts_pil_modes_png_cannot_store(client):
    cmyk = Image.new("CMYK", (40, 30), (10, 200, 30, 0))
    assert client.index([cmyk]).tokens.shape == (1, client.num_tokens, client.token_width)


def test_index_empty_list(client):
    result = client.index([])
    assert result.tokens.shape == (0, client.num_tokens, client.token_width)
    assert result.embeddings.shape == (0, client.embedding_dim)
    assert result.tokens.dtype == np.float16 and result.embeddings.dtype == np.float32


def test_large_index_is_chunked_and_equals_one_by_one(client):
    images = [png(seed) for seed in range(70)]
    assert client.spec.index_batch < len(images)
    together = client.index(images, progress=True)
    alone = [client.index([image]) for image in images]
    np.testing.assert_array_equal(together.tokens, np.concatenate([a.tokens for a in alone]))
    # ONNX Runtime's float32 embedding head is not bit-identical across batch sizes.
    embeddings = np.concatenate([a.embeddings for a in alone])
    np.testing.assert_allclose(together.embeddings, embeddings, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ score and rerank


def test_score_equals_raw_tritonclient(client, raw, protocol):
    n = client.spec.rank_batch + 4  # one more request than a single batch holds
    tokens = random_tokens(n, client.num_tokens, client.token_width)
    texts = [TEXTS[i % len(TEXTS)] for i in range(n)]
    scores = client.score(texts, tokens)
    half = n // 2
    expected = np.concatenate(
        [raw_rank(raw, protocol, texts[s], tokens[s]) for s in (slice(half), slice(half, n))]
    )
    assert scores.dtype == np.float32 and scores.shape == (n,)
    # The server batches concurrent requests dynamically; allow float rounding only.
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


def test_score_broadcasts_one_text_and_casts_float32(client):
    tokens = random_tokens(5, client.num_tokens, client.token_width, seed=1)
    one = client.score("dog", tokens)
    np.testing.assert_allclose(client.score(["dog"] * 5, tokens), one, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        client.score("dog", tokens.astype(np.float32)), one, rtol=1e-5, atol=1e-5
    )
    assert client.score("dog", tokens[:0]).shape == (0,)


def test_rerank_sorts_by_score_and_truncates(client):
    tokens = random_tokens(12, client.num_tokens, client.token_width, seed=2)
    ids = [f"doc{i}" for i in range(12)]
    scores = client.score("a red circle", tokens)
    order = np.argsort(-scores, kind="stable")

    results = client.rerank("a red circle", tokens, labels=ids)
    assert [r.index for r in results] == order.tolist()
    assert [r.id for r in results] == [ids[i] for i in order]
    np.testing.assert_allclose([r.score for r in results], scores[order], rtol=1e-5, atol=1e-5)

    top = client.rerank("a red circle", list(tokens), top_n=3)
    assert [r.index for r in top] == order[:3].tolist() and top[0].id is None

    probs = client.rerank("a red circle", tokens, return_probabilities=True)
    expected = 1.0 / (1.0 + np.exp(-scores[order].astype(np.float64)))
    np.testing.assert_allclose([r.score for r in probs], expected, rtol=1e-5, atol=1e-6)


def test_rerank_collection(client, tmp_path):
    tokens = random_tokens(6, client.num_tokens, client.token_width, seed=3)
    ids = [f"img{i}.png" for i in range(6)]
    collection = ImageCollection(tmp_path / "c", spec=client.spec.collection_spec())
    collection.add(ids, tokens, np.ones((6, client.embedding_dim), np.float32))
    everything = client.rerank_collection("dog", collection)
    some = client.rerank_collection("dog", collection, ids=["img4.png", "img1.png"], top_n=1)
    with pytest.raises(InvalidInputError, match="unknown id 'nope'"):
        client.rerank_collection("dog", collection, ids=["nope"])
    direct = client.rerank("dog", tokens, labels=ids)
    assert [(r.index, r.id) for r in everything] == [(r.index, r.id) for r in direct]
    assert len(some) == 1 and some[0].id == ["img4.png", "img1.png"][some[0].index]


def test_embed_texts_equals_raw_tritonclient(client, raw, protocol):
    module = MODULES[protocol]
    text = module.InferInput("text", [len(TEXTS), 1], "BYTES")
    text.set_data_from_numpy(np.array([[t.encode()] for t in TEXTS], dtype=object))
    expected = raw.infer("edje_text_embed", [text]).as_numpy("text_embedding")
    embeddings = client.embed_texts(TEXTS)
    assert embeddings.dtype == np.float32 and embeddings.shape == (len(TEXTS), client.embedding_dim)
    np.testing.assert_allclose(embeddings, expected, rtol=1e-5, atol=1e-6)
    assert client.embed_texts([]).shape == (0, client.embedding_dim)
    with pytest.raises(InvalidInputError, match="list"):
        client.embed_texts("dog")


def test_a_required_model_that_is_not_ready_is_named():
    endpoint = Endpoint("127.0.0.1:8001", "grpc", 1.0)
    ready = {"edje_index": True, "edje_rank": False, "edje_text_embed": False}
    with pytest.raises(ModelNotReadyError, match="'edje_rank' is not ready"):
        check_server_state(endpoint, True, ready)
    check_server_state(endpoint, True, {**ready, "edje_rank": True})  # text model is optional


def test_embed_texts_needs_the_optional_model():
    spec = ServerSpec(num_tokens=4, token_width=8, embedding_dim=2, index_batch=2, rank_batch=2)
    with pytest.raises(ModelNotReadyError, match="edje_text_embed"):
        embed_texts_plan(spec, ["dog"])


def test_a_plan_checks_the_tokens_once_and_merges_in_call_order(monkeypatch):
    spec = ServerSpec(num_tokens=2, token_width=3, embedding_dim=2, index_batch=2, rank_batch=2)
    checked, as_tokens = [], _core.as_tokens
    monkeypatch.setattr(_core, "as_tokens", lambda *a: checked.append(1) or as_tokens(*a))
    plan = rerank_plan(spec, "dog", np.zeros((5, 2, 3), np.float32), 2, False, list("abcde"))
    assert checked == [1] and [c.size for c in plan.calls] == [2, 2, 1] and plan.unit == "pair"
    scores = ([[0.0], [3.0]], [[1.0], [2.0]], [[5.0]])
    results = plan.merge([{"score": np.array(s, np.float32)} for s in scores])
    assert [(r.index, r.id, r.score) for r in results] == [(4, "e", 5.0), (1, "b", 3.0)]


# ------------------------------------------------------------------ async twin


def test_async_client_matches_sync(client, url, protocol):
    images = [png(seed) for seed in range(40)]
    tokens = random_tokens(8, client.num_tokens, client.token_width, seed=4)
    expected_index = client.index(images)
    expected_scores = client.score("dog", tokens)
    expected_texts = client.embed_texts(TEXTS)

    async def run():
        async with AsyncEDJEClient(url, protocol) as aclient:
            assert (aclient.num_tokens, aclient.embedding_dim) == (
                client.num_tokens,
                client.embedding_dim,
            )
            result = await aclient.index(images, progress=True)
            scores = await aclient.score("dog", tokens)
            ranked = await aclient.rerank("dog", tokens, top_n=2)
            empty = await aclient.index([])
            texts = await aclient.embed_texts(TEXTS)
            with pytest.raises(InvalidInputError, match="cannot decode"):
                await aclient.index([b"this is not an image"])
            shape = rf"\[N, {aclient.num_tokens}, {aclient.token_width}\]"
            with pytest.raises(InvalidInputError, match=shape):
                await aclient.score("dog", tokens[:, :3])
        return result, scores, ranked, empty, texts

    result, scores, ranked, empty, texts = asyncio.run(run())
    np.testing.assert_array_equal(result.tokens, expected_index.tokens)
    np.testing.assert_allclose(result.embeddings, expected_index.embeddings, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert [r.index for r in ranked] == np.argsort(-scores, kind="stable")[:2].tolist()
    assert len(empty) == 0
    np.testing.assert_allclose(texts, expected_texts, rtol=1e-5, atol=1e-6)


def test_async_client_connects_lazily(client, url, protocol):
    block = np.zeros((client.num_tokens, client.token_width), np.float16)

    async def run():
        aclient = AsyncEDJEClient(url, protocol)
        with pytest.raises(EDJEError, match="not connected"):
            _ = aclient.num_tokens
        scores = await aclient.score("dog", [block])
        await aclient.close()
        return scores

    assert asyncio.run(run()).shape == (1,)


# ------------------------------------------------------------------ errors


def test_bad_image_is_invalid_input_with_server_message(client, protocol):
    with pytest.raises(InvalidInputError) as info:
        client.index([png(0), b"this is not an image"])
    assert "cannot decode" in info.value.message
    assert info.value.status == {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}[protocol]


def test_client_side_validation(client, tmp_path):
    q, d = client.num_tokens, client.token_width
    with pytest.raises(InvalidInputError, match=rf"\[N, {q}, {d}\], got \[2, {q}, 7\]"):
        client.score("dog", np.zeros((2, q, 7), np.float16))
    with pytest.raises(InvalidInputError, match="shape"):
        client.score("dog", np.zeros((q, d), np.float16))
    nan = np.zeros((1, q, d), np.float32)
    nan[0, 0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        client.score("dog", nan)
    with pytest.raises(InvalidInputError, match="2 texts for 1"):
        client.score(["a", "b"], np.zeros((1, q, d), np.float16))
    with pytest.raises(InvalidInputError, match="labels"):
        client.rerank("dog", np.zeros((2, q, d), np.float16), labels=["only-one"])
    with pytest.raises(InvalidInputError, match="cannot read"):
        client.index([tmp_path / "missing.png"])


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_unreachable_server_is_connection_error(protocol, asynchronous):
    address = f"127.0.0.1:{find_free_port()}"
    with pytest.raises(APIConnectionError, match=address):
        if asynchronous:
            asyncio.run(AsyncEDJEClient(address, protocol, max_retries=0).connect())
        else:
            EDJEClient(address, protocol, max_retries=0)


@pytest.fixture
def attempts(monkeypatch) -> list[tuple[str, int]]:
    """Every failed attempt the retry policy sees, as (error class, attempt number)."""
    seen: list[tuple[str, int]] = []
    original = RetryPolicy.backoff

    def backoff(self, exc, attempt):
        seen.append((type(exc).__name__, attempt))
        return original(self, exc, attempt)

    monkeypatch.setattr(RetryPolicy, "backoff", backoff)
    return seen


def test_connection_errors_are_retried(protocol, attempts):
    with pytest.raises(APIConnectionError):
        EDJEClient(f"127.0.0.1:{find_free_port()}", protocol, max_retries=2)
    assert [a for _, a in attempts] == [0, 1, 2]


class Flaky:
    """A tritonclient client whose first ``failures`` infer calls raise ``error``."""

    def __init__(self, inner, calls: list[int], failures: int, error: Exception) -> None:
        self.inner, self.calls, self.failures, self.error = inner, calls, failures, error

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def infer(self, *args, **kwargs):
        self.calls.append(1)
        if len(self.calls) <= self.failures:
            raise self.error
        return self.inner.infer(*args, **kwargs)


def make_flaky(monkeypatch, failures: int, status: str) -> list[int]:
    calls: list[int] = []
    real = Endpoint.client
    error = InferenceServerException("server busy", status=status)
    monkeypatch.setattr(
        Endpoint, "client", lambda self, aio=False: Flaky(real(self, aio), calls, failures, error)
    )
    return calls


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_unavailable_is_retried_with_backoff(url, protocol, monkeypatch, asynchronous):
    status = {"http": "503", "grpc": "StatusCode.UNAVAILABLE"}[protocol]
    calls = make_flaky(monkeypatch, 2, status)

    async def run_async():
        async with AsyncEDJEClient(url, protocol, max_retries=2) as aclient:
            return await aclient.index([png(5)])

    if asynchronous:
        result = asyncio.run(run_async())
    else:
        with EDJEClient(url, protocol, max_retries=2) as sync_client:
            result = sync_client.index([png(5)])
    assert len(result) == 1 and len(calls) == 3


def test_retries_give_up_after_max_retries(url, protocol, monkeypatch):
    calls = make_flaky(monkeypatch, 10, {"http": "503", "grpc": "StatusCode.UNAVAILABLE"}[protocol])
    with EDJEClient(url, protocol, max_retries=1) as c, pytest.raises(ServerError) as info:
        c.index([png(6)])
    assert len(calls) == 2 and info.value.message == "server busy" and info.value.retryable


def test_invalid_input_is_not_retried(client, attempts):
    with pytest.raises(InvalidInputError):
        client.index([b"this is not an image"])
    assert attempts == [("InferenceServerException", 0)]


def test_deadline_is_timeout_error():
    error = as_edje_error(
        InferenceServerException("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED")
    )
    assert isinstance(error, APITimeoutError) and error.retryable


@pytest.mark.parametrize(
    ("exc", "cls", "retryable"),
    [
        (InferenceServerException("bad", "400"), InvalidInputError, False),
        (InferenceServerException("bad", "StatusCode.INVALID_ARGUMENT"), InvalidInputError, False),
        (InferenceServerException("gone", "404"), ModelNotReadyError, False),
        (InferenceServerException("boom", "500"), ServerError, False),
        (InferenceServerException("boom", "StatusCode.INTERNAL"), ServerError, False),
        (InferenceServerException("busy", "503"), ServerError, True),
        (InferenceServerException("busy", "502"), ServerError, True),
        (InferenceServerException("slow", "504"), ServerError, True),
        (InferenceServerException("queue full", "StatusCode.UNAVAILABLE"), ServerError, True),
        (
            InferenceServerException(
                "failed to connect to all addresses", "StatusCode.UNAVAILABLE"
            ),
            APIConnectionError,
            True,
        ),
        (ConnectionRefusedError(111, "Connection refused"), APIConnectionError, True),
        (TimeoutError("timed out"), APITimeoutError, True),
    ],
)
def test_error_conversion(exc, cls, retryable):
    error = as_edje_error(exc)
    assert type(error) is cls and error.retryable is retryable
    if isinstance(exc, InferenceServerException):
        assert error.message == exc.message() and error.status == exc.status()
    assert as_edje_error(ValueError("not ours")) is None


def test_backoff_is_full_jitter_within_the_cap():
    policy = RetryPolicy(max_retries=10, base_delay=0.1, max_delay=2.0)
    busy = InferenceServerException("busy", "503")
    for attempt in range(10):
        delays = [policy.backoff(busy, attempt) for _ in range(200)]
        assert min(delays) >= 0.0 and max(delays) <= min(2.0, 0.1 * 2**attempt)
    with pytest.raises(ServerError):
        policy.backoff(busy, 10)
    with pytest.raises(InvalidInputError):
        policy.backoff(InferenceServerException("bad", "400"), 0)


def test_sigmoid_is_stable():
    x = np.array([-1000.0, -1.0, 0.0, 1.0, 1000.0])
    np.testing.assert_allclose(sigmoid(x), [0.0, 0.26894142, 0.5, 0.73105858, 1.0], atol=1e-7)


# ------------------------------------------------------------------ CLI


def make_images(folder: Path, n: int) -> None:
    (folder / "sub").mkdir(parents=True)
    for i in range(n):
        target = folder / "sub" if i % 2 else folder
        Image.new("RGB", (40, 30), (i * 20 % 256, 255 - i * 20 % 256, 90)).save(target / f"{i}.png")
    (folder / "notes.txt").write_text("not an image, not picked up")


def test_cli_index_then_rerank(url, protocol, tmp_path, capsys):
    images, store = tmp_path / "images", tmp_path / "store"
    make_images(images, 5)
    server = ["--url", url, "--protocol", protocol]
    assert main(["index", str(images), "--collection", str(store), *server]) == 0
    assert "indexed 5 images" in capsys.readouterr().out

    assert main(["index", str(images), "--collection", str(store), *server]) == 0
    assert "5 already there" in capsys.readouterr().out

    args = ["rerank", "a green square", "--collection", str(store), "--top-n", "3", *server]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "score", "id"] and len(lines) == 4
    reader = ImageCollection(store, readonly=True)
    assert sorted(reader.ids()) == ["0.png", "2.png", "4.png", "sub/1.png", "sub/3.png"]
    assert reader.metadata(reader.rows_of(["sub/3.png"])) == [
        {"path": str((images / "sub" / "3.png").resolve())}
    ]
    with EDJEClient(url, protocol) as client:
        assert reader.spec == client.spec.collection_spec() and reader.spec.model_id
        expected = client.rerank_collection("a green square", reader, top_n=3)
    assert [line.split()[2] for line in lines[1:]] == [r.id for r in expected]

    args = ["rerank", "x", "--collection", str(store), "--ids", "0.png", "--probabilities", *server]
    assert main(args) == 0
    probability = float(capsys.readouterr().out.splitlines()[1].split()[1])
    assert 0.0 <= probability <= 1.0


def test_cli_reports_rejected_images(url, protocol, tmp_path, capsys):
    images, store = tmp_path / "images", tmp_path / "store"
    make_images(images, 3)
    (images / "broken.png").write_bytes(b"this is not an image")
    args = ["index", str(images), "--collection", str(store), "--url", url, "--protocol", protocol]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "indexed 3 images" in captured.out and "1 rejected" in captured.out
    assert "broken.png: " in captured.err and "cannot decode" in captured.err
    assert len(ImageCollection(store, readonly=True)) == 3


def test_cli_usage_and_connection_errors(tmp_path, capsys):
    assert main(["index", str(tmp_path / "missing"), "--collection", str(tmp_path / "s")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["rerank", "dog", "--collection", str(tmp_path / "missing")]) == 2
    assert "no collection at" in capsys.readouterr().err
    assert main(["serve", "--model-repository", str(tmp_path / "missing")]) == 2
    assert "make repo" in capsys.readouterr().err
    assert main([]) == 2
    assert main(["index", "--help"]) == 0
    assert "examples:" in capsys.readouterr().out

    (tmp_path / "a.png").write_bytes(png(0))
    address = f"127.0.0.1:{find_free_port()}"
    args = ["index", str(tmp_path / "a.png"), "--collection", str(tmp_path / "s")]
    assert main([*args, "--url", address]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach" in err and "Traceback" not in err


def test_launch_errors_are_edje_errors(tmp_path):
    server = TritonServer(tmp_path / "missing", http_port=0, grpc_port=0, metrics_port=0)
    with pytest.raises(LaunchError, match="model repository not found") as info:
        server.start()
    assert isinstance(info.value, EDJEError) and server.process is None


class _DiesWhileStarting(TritonServer):
    """A "server" that leaves a child in its process group and exits, as a tritonserver
    whose Python backend aborts while starting leaves its stubs behind."""

    def command(self) -> list[str]:
        return ["bash", "-c", "sleep 300 & echo $! > child.pid; exit 3"]


def test_a_server_that_dies_while_starting_takes_its_children_with_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    server = _DiesWhileStarting(tmp_path, http_port=0, grpc_port=0, metrics_port=0)
    with pytest.raises(LaunchError, match="exited with code 3 while starting"):
        server.start()
    child = int((tmp_path / "child.pid").read_text())
    deadline = time.monotonic() + 10
    stat = Path(f"/proc/{child}/stat")

    def running() -> bool:  # a zombie waiting for init to reap it counts as gone
        with contextlib.suppress(OSError):
            return stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"
        return False

    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(), "the dead server's child is still running"


def test_cli_serve_refuses_a_taken_port(repo_dir, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        args = ["serve", "--model-repository", str(repo_dir), "--http-port", str(port)]
        assert main([*args, "--grpc-port", "0", "--metrics-port", "0"]) == 2
    assert "already in use" in capsys.readouterr().err


def test_cli_serve_stops_cleanly_on_sigterm(repo_dir, tmp_path):
    args = ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]
    process = subprocess.Popen(
        [sys.executable, "-m", "edje_client.cli", "serve", "--model-repository", str(repo_dir)]
        + args
        + ["--log-file", str(tmp_path / "log.txt")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "Ctrl+C" in line:
                break
        grpc_url = next(line.split()[1] for line in lines if line.strip().startswith("gRPC"))
        with EDJEClient(grpc_url) as c:
            assert c.num_tokens > 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
    assert "stopping" in process.stdout.read()


# ------------------------------------------------------------------ packaging


def test_package_imports_without_torch():
    code = (
        "import sys; import edje_client; assert 'torch' not in sys.modules; edje_client.EDJEClient"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names():
    import edje_client

    assert RerankResult(index=1, score=0.5).id is None
    for name in edje_client.__all__:
        assert getattr(edje_client, name)
