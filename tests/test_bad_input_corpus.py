"""A generated bad-input corpus through both ensembles and both protocols, plus fuzzing.

Every bad case must get INVALID_ARG with a message, every good request sent beside it must get
its normal answer, and the server must keep running. Pillow is the independent oracle of what
is decodable: a mutated payload that Pillow still decodes is a *good* case and must succeed.
"""

from __future__ import annotations

import contextlib
import io
import random
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.images import encode, noise, png_header_only
from tests.triton_stub import load_model

MODULES = {"http": httpclient, "grpc": grpcclient}
INVALID = {"400", "StatusCode.INVALID_ARGUMENT"}
FORMATS = {"JPEG": {}, "PNG": {}, "WEBP": {}, "GIF": {}, "TIFF": {}, "BMP": {}}


def pillow_decodes(payload: bytes) -> bool:
    """The oracle: does Pillow fully decode it, as a supported format within the pixel limit?"""
    try:
        with Image.open(io.BytesIO(payload), formats=list(FORMATS)) as image:
            if image.size[0] * image.size[1] > 50_000_000:
                return False
            image.load()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not decodable"
        return False


def image_corpus() -> list[tuple[str, bytes]]:
    """About 240 mutated, truncated, empty, oversized or foreign payloads."""
    rng = random.Random(0)
    cases: list[tuple[str, bytes]] = [("empty", b"")]
    for fmt in FORMATS:
        data = encode(noise(48, 40, seed=len(fmt), mode="RGB"), fmt)
        for cut in (
            1,
            4,
            8,
            16,
            32,
            len(data) // 4,
            len(data) // 2,
            len(data) * 3 // 4,
            len(data) - 4,
        ):
            cases.append((f"{fmt}_truncated_{cut}", data[:cut]))
        for n in range(12):
            flipped = bytearray(data)
            for _ in range(1 + n):
                pos = rng.randrange(min(len(flipped), 64))
                flipped[pos] ^= 1 << rng.randrange(8)
            cases.append((f"{fmt}_header_flip_{n}", bytes(flipped)))
        for n in range(4):
            body = bytearray(data)
            start = rng.randrange(len(body) // 2, len(body) - 8)
            body[start : start + 8] = bytes(rng.randrange(256) for _ in range(8))
            cases.append((f"{fmt}_body_noise_{n}", bytes(body)))
    for w, h in (
        (100_000, 100_000),
        (65_535, 65_535),
        (20_000, 20_000),
        (1, 60_000_000),
        (8_000, 8_000),
    ):
        cases.append((f"bomb_{w}x{h}", png_header_only(w, h)))
    for n in range(50):
        cases.append(
            (f"garbage_{n}", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2000))))
        )
    cases += [
        ("text_as_image", b"a red circle left of a blue square"),
        ("html", b"<html><body>not an image</body></html>"),
        ("pdf_header", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"),
        ("ppm", encode(noise(8, 8), "PPM")),
        ("zip", b"PK\x03\x04" + b"\x00" * 40),
        ("png_signature_only", b"\x89PNG\r\n\x1a\n"),
        ("jpeg_soi_only", b"\xff\xd8\xff"),
        ("gif_header_only", b"GIF89a" + struct.pack("<HH", 10, 10)),
    ]
    return cases


def rank_corpus() -> list[tuple[str, object, np.ndarray, str]]:
    """(name, text, tokens, dtype) bad rank requests: text encodings, shapes, dtypes, NaN/Inf."""
    rng = np.random.default_rng(0)
    good = rng.standard_normal((1, 64, 384)).astype(np.float16)
    invalid_utf8 = [
        b"\xff",
        b"\xfe\xff",
        b"\xc3\x28",
        b"\xa0\xa1",
        b"\xe2\x28\xa1",
        b"\xe2\x82\x28",
        b"\xf0\x28\x8c\xbc",
        b"\xf0\x90\x28\xbc",
        b"\xf8\xa1\xa1\xa1\xa1",
        b"abc\x80",
        b"\xed\xa0\x80",
        b"\xc0\xaf",
        b"\xe0\x80\xaf",
        b"dog \xff cat",
        b"\x80" * 100,
    ]
    cases: list[tuple[str, object, np.ndarray, str]] = [
        (f"utf8_{i}", t, good, "FP16") for i, t in enumerate(invalid_utf8)
    ]
    for i, (q, d) in enumerate(((63, 384), (65, 384), (64, 383), (64, 1), (1, 384), (128, 384))):
        cases.append((f"shape_{i}", b"dog", np.zeros((1, q, d), np.float16), "FP16"))
    for dtype, np_dtype in (
        ("FP32", np.float32),
        ("FP64", np.float64),
        ("INT8", np.int8),
        ("INT32", np.int32),
        ("UINT8", np.uint8),
        ("BF16", None),
    ):
        if np_dtype is not None:
            cases.append((f"dtype_{dtype}", b"dog", np.zeros((1, 64, 384), np_dtype), dtype))
    for i, (value, pos) in enumerate(
        [
            (np.nan, (0, 0)),
            (np.inf, (63, 383)),
            (-np.inf, (10, 10)),
            (np.nan, (32, 100)),
            (np.inf, (0, 383)),
            (np.nan, (63, 0)),
        ]
    ):
        tokens = good.copy()
        tokens[0, pos[0], pos[1]] = value
        cases.append((f"nonfinite_{i}", b"dog", tokens, "FP16"))
    return cases


def _infer_index(module, client, payload: bytes):
    tensor = module.InferInput("image", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[payload]], dtype=object))
    return client.infer("edje_index", [tensor]).as_numpy("compressed_tokens")


def _infer_rank(module, client, text, tokens: np.ndarray, dtype: str = "FP16"):
    inputs = [
        module.InferInput("text", [1, 1], "BYTES"),
        module.InferInput("compressed_tokens", list(tokens.shape), dtype),
    ]
    inputs[0].set_data_from_numpy(np.array([[text]], dtype=object))
    inputs[1].set_data_from_numpy(tokens)
    return client.infer("edje_rank", inputs).as_numpy("score")


def test_corpus_has_over_200_cases():
    assert len(image_corpus()) + len(rank_corpus()) >= 200


def test_bad_input_corpus(triton_server, protocol):
    module = MODULES[protocol]
    url = triton_server.url(protocol)
    good_image = encode(noise(40, 30, seed=99))
    good_tokens = np.random.default_rng(5).standard_normal((1, 64, 384)).astype(np.float16)
    baseline_client = module.InferenceServerClient(url)
    baseline_tokens = _infer_index(module, baseline_client, good_image)
    baseline_score = _infer_rank(module, baseline_client, b"dog", good_tokens)
    baseline_client.close()

    jobs = [("index", name, payload) for name, payload in image_corpus()]
    jobs += [("rank", name, case) for name, *case in ((c[0], c[1:]) for c in rank_corpus())]
    jobs = [
        j
        for pair in zip(jobs, [("good", str(i), None) for i in range(len(jobs))], strict=True)
        for j in pair
    ]  # a good request beside every bad one

    def run(job):
        kind, name, payload = job
        client = module.InferenceServerClient(url)
        try:
            if kind == "index":
                return name, payload, _infer_index(module, client, payload)
            if kind == "rank":
                ((text, tokens, dtype),) = payload
                return name, None, _infer_rank(module, client, text, tokens, dtype)
            return (
                name,
                None,
                (
                    _infer_index(module, client, good_image),
                    _infer_rank(module, client, b"dog", good_tokens),
                ),
            )
        except InferenceServerException as exc:
            return name, payload, exc
        finally:
            client.close()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, jobs))

    counts = {"invalid_arg": 0, "decodable_ok": 0, "good_ok": 0}
    for (kind, name, _), (_, payload, result) in zip(jobs, results, strict=True):
        if kind == "good":
            tokens, score = result
            np.testing.assert_array_equal(tokens, baseline_tokens)
            np.testing.assert_allclose(score, baseline_score, rtol=1e-5)
            counts["good_ok"] += 1
        elif kind == "index" and pillow_decodes(payload):
            assert not isinstance(result, Exception), (
                f"{name}: Pillow decodes it, server refused: {result}"
            )
            counts["decodable_ok"] += 1
        else:
            assert isinstance(result, InferenceServerException), f"{name} was accepted"
            assert str(result.status()) in INVALID, f"{name}: {result.status()} {result.message()}"
            assert result.message() and "Traceback" not in result.message(), name
            counts["invalid_arg"] += 1
    assert counts["invalid_arg"] >= 200 and counts["good_ok"] == len(jobs) // 2
    assert triton_server.process.poll() is None and triton_server.is_ready()


@pytest.fixture(scope="module")
def preprocess(repo_dir):
    return load_model(repo_dir / "edje_preprocess")[1]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=st.binary(max_size=4096))
def test_fuzz_image_decoding_fails_only_cleanly(preprocess, payload):
    try:
        pixels = preprocess.decode_image(payload, 32, 2, 50_000_000, 1 << 20)
    except preprocess.ImageError as exc:
        assert str(exc)
    else:
        assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    mutation=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=12),
    cut=st.integers(0, 4096),
)
def test_fuzz_mutated_png(preprocess, mutation, cut):
    data = bytearray(encode(noise(20, 16, seed=1)))
    for pos, value in mutation:
        data[pos % len(data)] = value
    with contextlib.suppress(preprocess.ImageError):  # anything else fails the test
        preprocess.decode_image(bytes(data[: max(cut, 1)]), 32, 2, 50_000_000, 1 << 20)


@pytest.fixture(scope="module")
def tokenizer(repo_dir):
    model, module = load_model(repo_dir / "edje_tokenizer")
    return model.tokenizer, module


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(texts=st.lists(st.text(max_size=300), min_size=1, max_size=4))
def test_fuzz_tokenizer_keeps_the_layout(tokenizer, texts):
    tok, module = tokenizer
    ids, mask, types = module.encode_texts(tok, texts, 64)
    assert ids.shape == mask.shape == types.shape == (len(texts), 128)
    image_id = tok.token_to_id("<image>")
    for row in range(len(texts)):
        n = int(mask[row].sum())
        assert (ids[row, n - 65 : n - 1] == image_id).all()  # the 64 image slots, intact
        assert types[row, n - 65 : n].all() and not types[row, : n - 65].any()
        assert not mask[row, n:].any()
