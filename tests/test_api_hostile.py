"""The HTTP API against hostile requests, slow clients and a memory soak, under real uvicorn.

The corpus is sent as raw bytes (httpx refuses to send most of it), interleaved with good
requests whose answers must equal ``EDJEClient``'s; after each batch the service must be
healthy. ``make soak`` runs the soak for ``EDJE_API_SOAK_SECONDS`` (300) instead of 10 s.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import quote

import httpx
import numpy as np
import pytest

from edje_client import EDJEClient
from edje_client.api.server import api_process
from edje_client.collection import ImageCollection
from tests.api_support import (
    QUERY,
    TIMEOUT,
    http_bytes,
    indexed_collection,
    raw_request,
    rss_kib,
    running_api,
    settings,
)
from tests.images import bad_images, encode, noise, png_header_only

KEY = "hostile-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_DOCUMENTS = 50
MAX_BODY = 1 << 20
MAX_IMAGE = 200_000
BODY_TIMEOUT = 2.0
SOAK_SECONDS = float(os.environ.get("EDJE_API_SOAK_SECONDS", "10"))
BATCH = 25


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    expected: frozenset[int]


def case(name: str, data: bytes, *expected: int) -> Case:
    return Case(name, data, frozenset(expected))


def post_json(path: str, body: object | bytes, headers: dict | None = None) -> bytes:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http_bytes(
        "POST", path, raw, {"Content-Type": "application/json", **AUTH, **(headers or {})}
    )


def get(path: str, headers: dict | None = None) -> bytes:
    return http_bytes("GET", path, headers={**AUTH, **(headers or {})})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def rerank_cases(ids: list[str]) -> list[Case]:
    base = {"query": QUERY, "documents": ids[:3]}
    malformed = [
        b"{",
        b"[",
        b"}",
        b"nul",
        b'{"query": }',
        b'{"query": "x",}',
        b"'quoted'",
        b'{"query": "x"} trailing',
        b"\xff\xfe{}",
        b'{"query": "\xff\xfe"}',
        b'{"documents": [1, 2,]}',
        b"{" * 64,
    ]
    cases = [
        case(f"malformed_json_{n}", post_json("/v2/rerank", b), 400)
        for n, b in enumerate(malformed)
    ]
    cases.append(case("empty_body", post_json("/v2/rerank", b""), 400, 422))
    wrong = {
        "query": [5, None, [], {}, True, ""],
        "documents": [
            "a",
            5,
            {},
            None,
            [5],
            [None],
            [[]],
            [{"id": 5}],
            [{"image": 5}],
            [{}],
            [{"text": "x"}],
            [{"id": "a", "image": "b"}],
            [1.5],
            [True],
            [],
        ],
        "top_n": [0, -1, "3", 1.5, True, []],
        "return_documents": ["yes", 1, None],
        "raw_scores": ["true", 0],
        "max_tokens_per_doc": [-5, "x"],
        "model": [5, ["edje"]],
    }
    for field, values in wrong.items():
        for n, value in enumerate(values):
            cases.append(
                case(f"wrong_{field}_{n}", post_json("/v2/rerank", {**base, field: value}), 422)
            )
    for n, body in enumerate([{"query": QUERY}, {"documents": ids[:2]}, [], "text", 5, None]):
        cases.append(case(f"wrong_body_{n}", post_json("/v1/rerank", body), 422))

    hostile_ids = [
        "nope",
        "../../etc/passwd",
        "/etc/passwd",
        "..\\..\\boot.ini",
        "%2e%2e%2fetc",
        "file:///etc/passwd",
        ids[0] + "\x00",
        "\x00",
        "a\r\nSet-Cookie: x=y",
        "x" * 5000,
        " ",
        "",
    ]
    for n, bad in enumerate(hostile_ids):
        cases.append(
            case(f"hostile_id_{n}", post_json("/rerank", {**base, "documents": [ids[0], bad]}), 400)
        )
    cases.append(
        case(
            "too_many_documents", post_json("/v2/rerank", {**base, "documents": ids[:1] * 51}), 413
        )
    )
    cases.append(
        case("huge_id_array", post_json("/v2/rerank", {**base, "documents": ["a"] * 100_000}), 413)
    )
    cases.append(
        case("huge_int_array", post_json("/v2/rerank", {**base, "documents": [1] * 200_000}), 422)
    )

    bad_strings = [
        "###",
        "abc",
        "data:image/png;base64,@@@",
        "data:image/png,abcd",
        "data:text/html;base64,PGI+",
        "data:;base64,!!!!",
        "https://example.com/x.png",
        "http://169.254.169.254/latest/meta-data",
        "é",
        "",
        "data:image/png;base64,",
    ]
    for n, value in enumerate(bad_strings):
        cases.append(
            case(
                f"bad_base64_{n}",
                post_json("/v1/rerank", {**base, "documents": [{"image": value}]}),
                400,
            )
        )
    payloads = {name: p for name, (p, _) in bad_images().items() if p}
    payloads.update(
        bomb_65535=png_header_only(65_535, 65_535), bomb_tall=png_header_only(1, 60_000_000)
    )
    for name, payload in payloads.items():
        doc = {"image": "data:image/png;base64," + b64(payload)}
        cases.append(
            case(
                f"bad_image_{name}",
                post_json("/v2/rerank", {**base, "documents": [ids[0], doc]}),
                400,
            )
        )
    big = b64(np.random.default_rng(0).bytes(MAX_IMAGE + 1000))
    cases.append(
        case(
            "image_over_limit",
            post_json("/v2/rerank", {**base, "documents": [{"image": big}]}),
            413,
        )
    )
    return cases


def size_and_nesting_cases() -> list[Case]:
    auth_json = {"Content-Type": "application/json", **AUTH}
    cases = [
        case(
            "declared_2mib",
            http_bytes("POST", "/v2/rerank", b"{}", {**auth_json, "Content-Length": str(2 << 20)}),
            413,
        ),
        case(
            "declared_1e12",
            http_bytes("POST", "/v2/rerank", b"{}", {**auth_json, "Content-Length": str(10**12)}),
            413,
        ),
        case(
            "declared_huge",
            http_bytes("POST", "/v2/rerank", b"{}", {**auth_json, "Content-Length": "9" * 40}),
            400,  # h11 refuses a length it cannot hold
            413,
        ),
        case(
            "declared_negative",
            http_bytes("POST", "/v2/rerank", b"{}", {**auth_json, "Content-Length": "-1"}),
            400,
        ),
        case(
            "declared_text",
            http_bytes("POST", "/v2/rerank", b"{}", {**auth_json, "Content-Length": "abc"}),
            400,
        ),
        case(
            "sent_1_5mib", post_json("/v2/rerank", b'{"query": "' + b"x" * (3 << 19) + b'"}'), 413
        ),
        case(
            "sent_to_index", http_bytes("POST", "/v1/index", b"x" * (MAX_BODY + 1), auth_json), 413
        ),
    ]
    chunk = b"x" * 65536
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(24)) + b"0\r\n\r\n"
    te = {**auth_json, "Transfer-Encoding": "chunked"}
    cases.append(case("chunked_1_5mib", http_bytes("POST", "/v2/rerank", chunked, te), 413))
    both = {**te, "Content-Length": "10"}
    cases.append(
        case(
            "content_length_and_chunked", http_bytes("POST", "/v2/rerank", b"0\r\n\r\n", both), 400
        )
    )
    for depth in (16, 64, 256, 1024, 10_000, 100_000, 400_000):
        lists = b'{"query": "x", "documents": ' + b"[" * depth + b"]" * depth + b"}"
        cases.append(case(f"deep_lists_{depth}", post_json("/v2/rerank", lists), 400, 422))
    for depth in (100, 5_000, 100_000):
        dicts = b'{"a": ' * depth + b"1" + b"}" * depth
        cases.append(case(f"deep_dicts_{depth}", post_json("/v1/search", dicts), 400, 422))
        query = b'{"query": ' + b'{"q": ' * depth + b"1" + b"}" * depth + b"}"
        cases.append(case(f"deep_query_{depth}", post_json("/v1/search", query), 400, 422))
    return cases


def route_cases(ids: list[str]) -> list[Case]:
    image = "/v1/images/" + quote(ids[0], safe="")
    traversal = {
        "dotdot": ("/v1/images/../../etc/passwd", 404),
        "dotdot_encoded": ("/v1/images/..%2F..%2Fetc%2Fpasswd", 404),
        "dots_encoded": ("/v1/images/%2e%2e/%2e%2e/etc/passwd", 404),
        "absolute": ("/v1/images/%2Fetc%2Fpasswd", 404),
        "double_slash": ("/v1/images//etc/passwd", 404),
        "nul": ("/v1/images/%00", 400),
        "inner_nul": ("/v1/images/a%00b", 400),
        "id_nul": (image + "%00", 400),
        "file_url": ("/v1/images/file:%2F%2F%2Fetc%2Fpasswd", 404),
        "windows": ("/v1/images/C:%5Cwindows%5Cwin.ini", 404),
        "long": ("/v1/images/" + "a" * 3000, 400),
        "empty": ("/v1/images/", 400),
        "bad_utf8": ("/v1/images/%ff%fe", 404),
        "crlf": ("/v1/images/a%0d%0aSet-Cookie:%20x=y", 404),
        "size_0": (image + "?size=0", 422),
        "size_negative": (image + "?size=-1", 422),
        "size_text": (image + "?size=abc", 422),
        "size_huge": (image + "?size=100000", 422),
    }
    cases = [case(f"image_{n}", get(path), status) for n, (path, status) in traversal.items()]
    head = "GET /health HTTP/1.1\r\nHost: x\r\n"
    protocol = {
        "bare_lf_injection": (
            head + "X-A: a\nSet-Cookie: injected=1\r\nConnection: close\r\n\r\n",
            200,
        ),
        "cr_in_value": (head + "X-A: a\rSet-Cookie: x\r\n\r\n", 400),
        "nul_in_value": (head + "X-A: a\x00b\r\n\r\n", 400),
        "space_in_name": (head + "X A: b\r\n\r\n", 400),
        "conflicting_lengths": (head + "Content-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        "gzip_framing": (
            "POST /v2/rerank HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            400,
        ),
        "bad_method": ("G@T /health HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        "no_host": ("GET /health HTTP/1.1\r\n\r\n", 400),
        "binary_line": ("\x00\x01\x02 / HTTP/1.1\r\n\r\n", 400),
        "header_1mb": (head + "X-Big: " + "a" * 1_000_000 + "\r\n\r\n", 400),
        "http10": ("GET /health HTTP/1.0\r\n\r\n", 200),
        "host_injection": (
            "GET /health HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
            200,
        ),
    }
    cases += [case(f"protocol_{n}", raw.encode("latin-1"), s) for n, (raw, s) in protocol.items()]
    keys = {
        "none": None,
        "wrong": "Bearer wrong",
        "empty": "Bearer",
        "basic": f"Basic {KEY}",
        "longer": f"Bearer {KEY}x",
        "shorter": f"Bearer {KEY[:-1]}",
        "long": "Bearer " + "k" * 10_000,
        "utf8": "Bearer \xd0\xba\xd0\xbb",
        "crlf": "Bearer wrong\r\nX-Admin: 1",
    }
    body = json.dumps({"query": QUERY, "documents": ids[:2]}).encode()
    for name, value in keys.items():
        headers = {
            "Content-Type": "application/json",
            **({"Authorization": value} if value else {}),
        }
        cases.append(case(f"auth_{name}", http_bytes("POST", "/v2/rerank", body, headers), 401))
    for path in ("/metrics", "/openapi.json", image, "/nope", "/v1/images/../../etc/passwd"):
        cases.append(case(f"auth_none_{path}", http_bytes("GET", path), 401))
    for path in ("/", "/static/page.css"):  # the page: public, holds no data
        cases.append(case(f"public_{path}", http_bytes("GET", path), 200))
    for path in ("/static/../settings.py", "/static/%2e%2e/settings.py", "/static/..%2fapp.py"):
        cases.append(case(f"static_traversal_{path}", http_bytes("GET", path), 404))
    cases.append(
        case(
            "auth_lowercase_scheme",
            http_bytes("GET", "/metrics", headers={"Authorization": f"bearer {KEY}"}),
            200,
        )
    )
    cases.append(case("health_needs_no_key", http_bytes("GET", "/health"), 200))
    boundary = "b0undary"
    field = f'--{boundary}\r\nContent-Disposition: form-data; name="files"'
    part = f"{field}\r\n\r\nnot a file\r\n--{boundary}--\r\n"
    files = (f'{field}; filename="{n}.png"\r\n\r\nx\r\n' for n in range(MAX_DOCUMENTS + 10))
    many = "".join(files) + f"--{boundary}--\r\n"
    multipart = f"multipart/form-data; boundary={boundary}"
    index = {
        "text_plain": (b"x", "text/plain", 415),
        "form_urlencoded": (b"files=x", "application/x-www-form-urlencoded", 415),
        "no_boundary": (b"--x\r\n", "multipart/form-data", 400),
        "garbage_multipart": (b"\x00" * 100, multipart, 400),
        "text_part": (part.encode(), multipart, 200),
        "too_many_files": (many.encode(), multipart, 400),
        "no_images": (b'{"images": []}', "application/json", 422),
        "bad_json": (b'{"images": [', "application/json", 400),
        "bad_item": (b'{"images": [{"id": "i", "image": "%%%"}]}', "application/json", 200),
    }
    for name, (raw, kind, status) in index.items():
        cases.append(
            case(
                f"index_{name}",
                http_bytes("POST", "/v1/index", raw, {"Content-Type": kind, **AUTH}),
                status,
            )
        )
    methods = {
        "get_rerank": ("GET", "/v2/rerank", 405),
        "put_search": ("PUT", "/v1/search", 405),
        "delete_index": ("DELETE", "/v1/index", 405),
        "unknown": ("GET", "/nope", 404),
        "post_health": ("POST", "/health", 405),
        "options": ("OPTIONS", "/v2/rerank", 405),
    }
    cases += [
        case(f"method_{n}", http_bytes(m, p, headers=AUTH), s) for n, (m, p, s) in methods.items()
    ]
    return cases


def hostile_corpus(ids: list[str]) -> list[Case]:
    return rerank_cases(ids) + size_and_nesting_cases() + route_cases(ids)


@pytest.fixture(scope="module")
def collection(triton_server, tmp_path_factory):
    path = indexed_collection(triton_server, tmp_path_factory.mktemp("hostile"), scenes=8)
    with ImageCollection(path, readonly=True) as c:
        yield c


@pytest.fixture(scope="module")
def api(triton_server, collection):
    limits = {
        "max_documents": MAX_DOCUMENTS,
        "max_body_bytes": MAX_BODY,
        "api_key": KEY,
        "max_image_bytes": MAX_IMAGE,
        "body_timeout": BODY_TIMEOUT,
    }
    with running_api(settings(triton_server, collection.path, **limits)) as server:
        yield server


class Oracle:
    """A good request and its expected answer, computed directly with ``EDJEClient``."""

    def __init__(self, triton_server, collection: ImageCollection) -> None:
        self.ids = collection.ids()
        image = encode(noise(40, 30, seed=7))
        self.body = {"query": QUERY, "documents": [*self.ids, {"image": b64(image)}]}
        with EDJEClient(triton_server.grpc_url) as client:
            logits = np.concatenate(
                [
                    client.score(QUERY, collection.tokens(range(len(self.ids)))),
                    client.score(QUERY, client.index([image]).tokens),
                ]
            )
        order = np.argsort(-logits, kind="stable")
        from edje_client._core import sigmoid

        self.expected = [(int(i), float(sigmoid(logits)[i])) for i in order]

    def check(self, http: httpx.Client) -> None:
        answer = http.post("/v2/rerank", json=self.body, headers=AUTH)
        assert answer.status_code == 200, answer.text
        got = [(r["index"], r["relevance_score"]) for r in answer.json()["results"]]
        assert [i for i, _ in got] == [i for i, _ in self.expected]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in self.expected], rtol=1e-6)


def test_hostile_corpus(api, collection, triton_server):
    corpus = hostile_corpus(collection.ids())
    assert len(corpus) >= 100
    oracle = Oracle(triton_server, collection)
    local = threading.local()

    def http() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=api.url, timeout=TIMEOUT)
        return local.client

    def run(job: Case | None):
        if job is None:
            oracle.check(http())
            return None
        return job, raw_request(api.port, job.data, timeout=30)

    counts: Counter[int] = Counter()
    good, wrong = 0, []
    with ThreadPoolExecutor(4) as pool:
        for start in range(0, len(corpus), BATCH):
            batch = corpus[start : start + BATCH]
            jobs = [j for c in batch for j in (c, None)]  # a good request beside every bad one
            for result in pool.map(run, jobs):
                if result is None:
                    good += 1
                    continue
                job, (status, head, body) = result
                counts[status] += 1
                if status not in job.expected:
                    wrong.append(f"{job.name}: {status} not in {sorted(job.expected)}")
                assert b"set-cookie" not in head.lower(), f"{job.name}: injected a header"
                for secret in (b"Traceback", b"ApiSettings", bytes(str(collection.path), "utf-8")):
                    assert secret not in body, f"{job.name}: the answer shows {secret!r}"
            health = http().get("/health")
            assert health.status_code == 200 and health.json()["status"] == "ok"
    print(
        f"\nhostile corpus: {len(corpus)} cases, by status {dict(sorted(counts.items()))}; "
        f"{good} good requests beside them, all exact"
    )
    assert not wrong, wrong
    assert good == len(corpus)
    oracle.check(http())


def test_slow_clients_hold_only_their_own_connection(api, collection, triton_server):
    oracle = Oracle(triton_server, collection)
    body = json.dumps(oracle.body).encode()
    head = http_bytes("POST", "/v2/rerank", body, {"Content-Type": "application/json", **AUTH})
    trickling, partial_heads = [], []
    for _ in range(6):  # headers and part of the body, then a byte now and then
        sock = socket.create_connection(("127.0.0.1", api.port), timeout=10)
        sock.sendall(head[: len(head) - len(body) // 2])
        trickling.append(sock)
    for _ in range(6):  # a request line and half a header, never finished
        sock = socket.create_connection(("127.0.0.1", api.port), timeout=10)
        sock.sendall(b"POST /v2/rerank HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        partial_heads.append(sock)
    try:
        with httpx.Client(base_url=api.url, timeout=TIMEOUT) as http:
            start = time.monotonic()
            for _ in range(3):
                for sock in trickling:
                    sock.sendall(b" ")
                oracle.check(http)
            assert time.monotonic() - start < BODY_TIMEOUT  # not queued behind the slow ones
            time.sleep(BODY_TIMEOUT + 0.5)
            for sock in trickling:  # the body deadline is total, not per byte
                status, _, answer = read_answer(sock)
                assert status == 408 and b"did not arrive" in answer
            oracle.check(http)
            assert http.get("/health").status_code == 200
    finally:
        for sock in trickling + partial_heads:
            sock.close()
    print(
        f"\nslow clients: {len(trickling)} trickling bodies got 408 after {BODY_TIMEOUT} s, "
        f"{len(partial_heads)} unfinished heads held only their connections"
    )


def test_real_clients_see_413_for_oversized_bodies(api):
    """httpx, which sends its whole body before reading, still gets the 413 (the API drains)."""
    big = b'{"query": "' + b"x" * (3 * MAX_BODY) + b'"}'

    def chunks():
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    with httpx.Client(base_url=api.url, timeout=TIMEOUT, headers=AUTH) as http:
        for content in (big, chunks()):
            answer = http.post("/v2/rerank", content=content, headers={"Content-Type": "x/json"})
            assert answer.status_code == 413 and "exceeds the limit" in answer.json()["detail"]
        assert http.get("/health").status_code == 200


def read_answer(sock: socket.socket) -> tuple[int, bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), head, body


def test_api_soak_memory(triton_server, collection):
    """The API's resident memory after warm-up and at the end of a mixed load."""
    ids = collection.ids()
    image = b64(encode(noise(40, 30, seed=3)))
    requests = [
        ("POST", "/v2/rerank", {"query": QUERY, "documents": ids}),
        ("POST", "/v1/rerank", {"query": QUERY, "documents": [ids[0], {"image": image}]}),
        ("POST", "/v1/search", {"query": QUERY, "k": 5}),
        ("POST", "/v2/rerank", {"query": QUERY, "documents": ["missing"]}),
        ("POST", "/v2/rerank", {"query": QUERY, "documents": [{"image": "###"}]}),
        ("GET", "/v1/images/" + quote(ids[0], safe=""), None),
        ("GET", "/health", None),
        ("GET", "/metrics", None),
    ]
    warm_up = max(3.0, SOAK_SECONDS / 5)
    env = {"EDJE_API_KEY": ""}
    with api_process(collection.path, triton_server.grpc_url, env=env) as process:
        url, pid = process.url, process.pid
        stop, sent, failures = threading.Event(), Counter(), []

        def load() -> None:
            with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
                while not stop.is_set():
                    for method, path, body in requests:
                        status = http.request(method, path, json=body).status_code
                        sent[status] += 1
                        if status >= 500:
                            failures.append((path, status))

        workers = [threading.Thread(target=load) for _ in range(2)]
        for w in workers:
            w.start()
        try:
            time.sleep(warm_up)
            after_warm_up = rss_kib(pid)
            time.sleep(SOAK_SECONDS)
            at_end = rss_kib(pid)
        finally:
            stop.set()
            for w in workers:
                w.join(timeout=30)
    growth = at_end / after_warm_up - 1
    print(
        f"\nAPI soak: {SOAK_SECONDS:.0f} s after {warm_up:.0f} s warm-up, {sum(sent.values())} "
        f"requests {dict(sorted(sent.items()))}; VmRSS {after_warm_up / 1024:.1f} MiB after "
        f"warm-up, {at_end / 1024:.1f} MiB at the end ({growth:+.1%})"
    )
    assert not failures and sent[200] > 0
    assert growth < 0.10
