"""The real tritonserver serving the built repository, over HTTP and gRPC."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image, ImageOps
from tritonclient.utils import InferenceServerException

from tests.images import bad_images, good_images

MODULES = {"http": httpclient, "grpc": grpcclient}
INVALID = {"400", "StatusCode.INVALID_ARGUMENT"}
TEXTS = ["a red circle left of a blue square", "dog", "", "the cat sleeping on a sofa " * 4]


@pytest.fixture
def client(triton_server, protocol):
    c = MODULES[protocol].InferenceServerClient(triton_server.url(protocol))
    yield c
    c.close()


def _input(protocol: str, name: str, array: np.ndarray, dtype: str):
    tensor = MODULES[protocol].InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def index(client, protocol: str, payloads: list[bytes]):
    images = np.array([[p] for p in payloads], dtype=object)
    result = client.infer("edje_index", [_input(protocol, "image", images, "BYTES")])
    return result.as_numpy("compressed_tokens"), result.as_numpy("image_embedding")


def rank(client, protocol: str, texts: list[str | bytes], tokens: np.ndarray, dtype: str = "FP16"):
    items = np.array([[t.encode() if isinstance(t, str) else t] for t in texts], dtype=object)
    inputs = [
        _input(protocol, "text", items, "BYTES"),
        _input(protocol, "compressed_tokens", tokens, dtype),
    ]
    return client.infer("edje_rank", inputs).as_numpy("score")[:, 0]


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 64, 384)).astype(np.float16)


def test_index_matches_pytorch(client, protocol, tiny_models, tiny_source):
    images = {k: v for k, v in good_images().items() if k != "gray16_png"}
    tokens, embeddings = index(client, protocol, list(images.values()))
    processor = tiny_source.image_processor()
    pil = [ImageOps.exif_transpose(Image.open(io.BytesIO(b))) for b in images.values()]
    pixels = torch.from_numpy(processor(images=pil, return_tensors="np")["pixel_values"])
    with torch.no_grad():
        ref = tiny_models[0].encode(pixels)
    assert tokens.dtype == np.float16 and tokens.shape == (len(images), 64, 384)
    np.testing.assert_allclose(
        tokens.astype(np.float32), ref.compressed_tokens.numpy(), atol=2e-3, rtol=2e-3
    )
    np.testing.assert_allclose(embeddings, ref.image_embedding.numpy(), atol=1e-4)


def test_rank_matches_pytorch(client, protocol, tiny_models, tiny_source):
    tokens = _tokens(len(TEXTS))
    scores = rank(client, protocol, TEXTS, tokens)
    text = tiny_source.tokenizer()(
        TEXTS, padding=True, truncation=True, max_length=63, return_tensors="pt"
    )
    with torch.no_grad():
        ref = tiny_models[1](torch.from_numpy(tokens), text["input_ids"], text["attention_mask"])
    assert scores.dtype == np.float32 and scores.shape == (len(TEXTS),)
    assert np.abs(scores - ref.numpy()).max() <= 1e-3


def test_text_embed_matches_pytorch(client, protocol, tiny_source):
    texts = ["a red circle", "", "dog " * 100]
    items = np.array([[t.encode()] for t in texts], dtype=object)
    result = client.infer("edje_text_embed", [_input(protocol, "text", items, "BYTES")])
    embeddings = result.as_numpy("text_embedding")
    model, _ = tiny_source.build_text_model()
    enc = tiny_source.text_tokenizer()(
        texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt"
    )
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model(input_ids=enc["input_ids"]).pooler_output, dim=-1)
    assert embeddings.shape == (3, 64) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embeddings, ref.numpy(), atol=1e-5)


def _expect_invalid(call, fragment: str) -> None:
    with pytest.raises(InferenceServerException) as exc:
        call()
    assert str(exc.value.status()) in INVALID, exc.value
    assert fragment in exc.value.message()


@pytest.mark.parametrize("name", sorted(bad_images()))
def test_bad_image_is_invalid_arg(client, protocol, name, triton_server):
    payload, fragment = bad_images()[name]
    _expect_invalid(lambda: index(client, protocol, [payload]), fragment)
    assert triton_server.is_ready()


def test_bad_rank_inputs_are_invalid_arg(client, protocol, triton_server):
    _expect_invalid(lambda: rank(client, protocol, [b"\xff\xfe"], _tokens(1)), "not valid UTF-8")
    nan = _tokens(2)
    nan[1, 0, 0] = np.nan
    _expect_invalid(lambda: rank(client, protocol, ["a", "b"], nan), "NaN or Inf")
    _expect_invalid(lambda: rank(client, protocol, ["a"], _tokens(1)[:, :63]), "compressed_tokens")
    _expect_invalid(
        lambda: rank(client, protocol, ["a"], _tokens(1).astype(np.float32), "FP32"), "FP32"
    )
    assert triton_server.is_ready()
    assert rank(client, protocol, ["dog"], _tokens(1)).shape == (1,)


def _stats(client, protocol: str, model: str) -> tuple[int, int]:
    """(inference_count, execution_count), once Triton has finished counting."""
    previous = None
    while (current := _read_stats(client, protocol, model)) != previous:
        previous = current
        time.sleep(0.2)  # statistics are recorded just after the response is sent
    return current


def _read_stats(client, protocol: str, model: str) -> tuple[int, int]:
    stats = (
        client.get_inference_statistics(model, as_json=True)
        if protocol == "grpc"
        else client.get_inference_statistics(model)
    )
    entry = stats["model_stats"][0]
    return int(entry.get("inference_count", 0)), int(entry.get("execution_count", 0))


def test_concurrent_requests_are_batched_and_bad_ones_fail_alone(client, protocol, triton_server):
    alone = {
        i: rank(client, protocol, [f"query {i}"], _tokens(1, seed=i))[0] for i in range(0, 32, 2)
    }
    before = _stats(client, protocol, "edje_ranker")
    start = threading.Barrier(32)

    def call(i: int):
        tokens = _tokens(1, seed=i)
        if i % 2:
            tokens[0, 1, 2] = np.inf
        c = MODULES[protocol].InferenceServerClient(triton_server.url(protocol))
        start.wait()  # fire all 32 together
        try:
            return rank(c, protocol, [f"query {i}"], tokens)[0]
        except InferenceServerException as exc:
            return exc
        finally:
            c.close()

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, range(32)))
    after = _stats(client, protocol, "edje_ranker")
    for i, result in enumerate(results):
        if i % 2:
            assert isinstance(result, InferenceServerException) and "NaN or Inf" in result.message()
        else:
            assert abs(float(result) - float(alone[i])) <= 1e-4
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == 32  # every request reached the ranker (bad ones are refused there)
    assert executions < inferences  # single-pair requests were combined into fewer executions
