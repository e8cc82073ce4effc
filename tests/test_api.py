"""The HTTP API (``edje api``) under real uvicorn, against the real tritonserver, with real
clients: the official Cohere SDK, httpx in the Jina shape, multipart uploads.

Every score the API returns is checked against ``EDJEClient`` computing the same thing directly.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import cohere
import httpx
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image

from edje.build_repo import RepoSettings, build_repository
from edje_client import EDJEClient
from edje_client.api.command import settings_from_args
from edje_client.api.settings import ApiSettings
from edje_client.cli import build_parser
from edje_client.collection import ImageCollection
from edje_client.errors import ServerError
from edje_client.search import search
from edje_client.server import TritonServer, find_free_port
from tests.api_support import QUERY, TIMEOUT, indexed_collection, running_api, settings
from tests.images import bad_images, encode, noise, png_header_only

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def collection_path(triton_server, tmp_path_factory):
    return indexed_collection(triton_server, tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def collection(collection_path):
    with ImageCollection(collection_path, readonly=True) as c:
        yield c


@pytest.fixture(scope="module")
def direct(triton_server):
    with EDJEClient(triton_server.grpc_url) as client:
        yield client


@pytest.fixture(scope="module")
def api(triton_server, collection_path):
    with running_api(settings(triton_server, collection_path)) as server:
        yield server


@pytest.fixture(scope="module")
def http(api):
    with httpx.Client(base_url=api.url, timeout=TIMEOUT) as client:
        yield client


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_cohere_sdk_equals_rerank_collection(api, collection, direct):
    ids = collection.ids()
    co = cohere.ClientV2(api_key="any", base_url=api.url, timeout=30)
    answer = co.rerank(model="edje", query=QUERY, documents=ids, top_n=3)
    expected = direct.rerank_collection(QUERY, collection, ids, 3, return_probabilities=True)
    assert [r.index for r in answer.results] == [e.index for e in expected]
    assert [r.relevance_score for r in answer.results] == [e.score for e in expected]
    assert all(0.0 < r.relevance_score < 1.0 for r in answer.results) and answer.id


def test_every_rerank_path_and_raw_scores(http, collection, direct):
    ids = collection.ids()[::-1]
    logits = direct.rerank_collection(QUERY, collection, ids)
    probabilities = direct.rerank_collection(QUERY, collection, ids, return_probabilities=True)
    for path in ("/v2/rerank", "/v1/rerank", "/rerank"):
        body = {"model": "edje", "query": QUERY, "documents": ids}
        answer = http.post(path, json=body).json()
        assert [(r["index"], r["relevance_score"]) for r in answer["results"]] == [
            (e.index, e.score) for e in probabilities
        ]
        assert answer["model"] == "edje" and answer["usage"]["documents"] == len(ids)
    objects = [{"id": i} for i in ids]
    body = {"query": QUERY, "documents": objects, "raw_scores": True, "return_documents": True}
    answer = http.post("/v1/rerank", json=body).json()
    assert [r["relevance_score"] for r in answer["results"]] == [e.score for e in logits]
    assert [r["document"] for r in answer["results"]] == [{"id": e.id} for e in logits]
    assert (
        "document"
        not in http.post("/rerank", json={**body, "return_documents": False}).json()["results"][0]
    )


def test_api_key_on_every_route_but_health_and_the_page(triton_server, collection_path, collection):
    with running_api(settings(triton_server, collection_path, api_key=KEY)) as server:
        ids = collection.ids()[:4]
        good = cohere.ClientV2(api_key=KEY, base_url=server.url, timeout=30)
        assert len(good.rerank(model="edje", query=QUERY, documents=ids).results) == 4
        wrong = cohere.ClientV2(api_key="wrong", base_url=server.url, timeout=30)
        with pytest.raises(cohere.errors.UnauthorizedError):
            wrong.rerank(model="edje", query=QUERY, documents=ids)
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
            assert http.get("/health").status_code == 200
            assert http.get("/").status_code == 200  # the page asks for the key itself
            for method, path in (
                ("GET", "/metrics"),
                ("GET", "/openapi.json"),
                ("POST", "/v1/search"),
            ):
                answer = http.request(method, path)
                assert answer.status_code == 401 and "API key" in answer.json()["detail"], path
                assert answer.headers["www-authenticate"] == "Bearer"
            bearer = {"Authorization": f"Bearer {KEY}"}
            assert http.get("/metrics", headers=bearer).status_code == 200
            assert (
                http.get("/metrics", headers={"Authorization": f"Basic {KEY}"}).status_code == 401
            )


def test_jina_image_documents_equal_rerank_of_index(http, direct, collection):
    images = [encode(noise(48, 36, seed=s)) for s in (1, 2, 3)]
    documents = [
        {"image": b64(images[0])},
        {"image": "data:image/png;base64," + b64(images[1])},
        "data:image/png;base64," + b64(images[2]),
    ]
    body = {"model": "edje", "query": QUERY, "documents": documents, "return_documents": True}
    answer = http.post("/v1/rerank", json=body)
    assert answer.status_code == 200, answer.text
    tokens = direct.index(images).tokens
    expected = direct.rerank(QUERY, tokens, return_probabilities=True)
    results = answer.json()["results"]
    assert [(r["index"], r["relevance_score"]) for r in results] == [
        (e.index, e.score) for e in expected
    ]
    assert results[0]["document"] == (
        documents[results[0]["index"]]
        if isinstance(documents[results[0]["index"]], dict)
        else {"image": documents[results[0]["index"]]}
    )
    assert answer.json()["usage"]["images_indexed"] == 3

    # Stored ids and inline images in one request are ranked together.
    stored = collection.ids()[:2]
    mixed = {"query": QUERY, "documents": [stored[0], documents[0], {"id": stored[1]}]}
    results = http.post("/v2/rerank", json={**mixed, "raw_scores": True}).json()["results"]
    got = {r["index"]: r["relevance_score"] for r in results}
    by_id = {r.id: r.score for r in direct.rerank_collection(QUERY, collection, stored)}
    assert got[0] == by_id[stored[0]] and got[2] == by_id[stored[1]]
    assert got[1] == pytest.approx(float(direct.score(QUERY, tokens[:1])[0]), rel=1e-6)


def test_bad_documents_are_named(http, collection):
    cases = {
        "unknown id": (["nope.png"], 400, "documents[0]: unknown id 'nope.png'"),
        "invalid base64": ([{"image": "###"}], 400, "documents[0]: invalid base64"),
        "bad image": ([collection.ids()[0], {"image": b64(b"not an image")}], 400, "documents[1]"),
        "bomb": ([{"image": b64(png_header_only(100_000, 100_000))}], 400, "exceeds the limit"),
        "url": ([{"image": "https://example.com/a.png"}], 400, "not fetched"),
        "text": ([{"text": "a document"}], 422, "text documents are not supported"),
        "empty": ([], 422, "documents"),
    }
    for name, (documents, status, fragment) in cases.items():
        answer = http.post("/v2/rerank", json={"query": QUERY, "documents": documents})
        assert answer.status_code == status, (name, answer.text)
        assert fragment in answer.json()["detail"], (name, answer.json())
    answer = http.post("/v2/rerank", json={"query": QUERY, "documents": ["a"], "top_n": 0})
    assert answer.status_code == 422 and "top_n" in answer.json()["detail"]
    answer = http.post("/v2/rerank", content=b'{"query": "x", ', headers=JSON)
    assert answer.status_code == 400 and "not valid JSON" in answer.json()["detail"]


JSON = {"Content-Type": "application/json"}


def test_search_equals_client_search_and_serves_images(http, direct, collection):
    answer = http.post("/v1/search", json={"query": QUERY, "k": 5, "rerank_top_k": 8})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected = search(direct, collection, QUERY, 5, 8)
    assert [h["id"] for h in body["hits"]] == [h.id for h in expected.hits]
    assert [h["score"] for h in body["hits"]] == [h.score for h in expected.hits]
    assert [h["first_stage_score"] for h in body["hits"]] == [
        h.first_stage_score for h in expected.hits
    ]
    assert [h["first_stage_rank"] for h in body["hits"]] == [
        h.first_stage_rank for h in expected.hits
    ]
    assert [h["rank"] for h in body["hits"]] == list(range(5))
    assert set(body["timings_ms"]) >= {"embed_query", "first_stage", "rerank", "total"}
    first = body["hits"][0]
    assert "path" not in first["metadata"] and first["image_url"].startswith("/v1/images/")
    stored = collection.metadata(collection.rows_of([first["id"]]))[0]["path"]
    image = http.get(first["image_url"])
    assert image.status_code == 200 and image.content == Path(stored).read_bytes()
    assert image.headers["content-type"] == "image/png"
    thumb = http.get(first["image_url"], params={"size": 32})
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 32
    for path in (
        "/v1/images/nope.png",
        "/v1/images/../../etc/passwd",
        "/v1/images/%2Fetc%2Fpasswd",
    ):
        assert http.get(path).status_code == 404, path
    assert http.get(first["image_url"], params={"size": 0}).status_code == 422
    first_stage = http.post("/v1/search", json={"query": QUERY, "k": 3, "rerank_top_k": 0}).json()
    assert all(h["score"] is None for h in first_stage["hits"])
    assert http.post("/v1/search", json={"query": QUERY, "filter": {"nope": 1}}).status_code == 400


def test_index_stores_good_images_and_reports_bad_ones(triton_server, tmp_path, direct):
    good = {f"good{i}.png": encode(noise(40, 30, seed=20 + i)) for i in range(3)}
    bad = {name: payload for name, (payload, _) in bad_images().items() if payload}
    with (
        running_api(settings(triton_server, tmp_path / "new_collection")) as server,
        httpx.Client(base_url=server.url, timeout=TIMEOUT) as http,
    ):
        names = ["good0.png", "bad.png", "good1.png"]
        files = [("files", (n, good.get(n, bad["garbage"]), "image/png")) for n in names]
        answer = http.post("/v1/index", files=files)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["indexed"], body["failed"], body["rows"]) == (2, 1, 2)
        assert [r["status"] for r in body["results"]] == ["indexed", "error", "indexed"]
        assert "cannot decode" in body["results"][1]["error"]

        images = [{"id": "good2.png", "image": b64(good["good2.png"])}]
        images += [{"id": "good0.png", "image": b64(good["good0.png"])}]  # already stored
        images += [{"id": "b64", "image": "%%%"}, {"id": "good2.png", "image": b64(b"x")}]
        images += [{"id": name, "image": b64(payload)} for name, payload in bad.items()]
        body = http.post("/v1/index", json={"images": images}).json()
        assert (body["indexed"], body["rows"]) == (1, 3)
        errors = [r.get("error", "") for r in body["results"]]
        assert errors[0] == "" and "already in the collection" in errors[1]
        assert "invalid base64" in errors[2] and "more than once" in errors[3]
        assert all(e for e in errors[4:]) and body["failed"] == len(images) - 1

        answer = http.post("/v1/index", files=[("files", ("", good["good0.png"], "image/png"))])
        assert answer.json()["results"][0]["status"] == "error"  # an empty id
        assert (
            http.post("/v1/index", content=b"x", headers={"Content-Type": "text/plain"}).status_code
            == 415
        )

        # Stored images rank by id exactly as their freshly indexed tokens do.
        ids = ["good0.png", "good1.png", "good2.png"]
        results = http.post("/v2/rerank", json={"query": QUERY, "documents": ids}).json()["results"]
        tokens = direct.index([good[i] for i in ids]).tokens
        expected = direct.rerank(QUERY, tokens, return_probabilities=True)
        assert [(r["index"], r["relevance_score"]) for r in results] == [
            (e.index, e.score) for e in expected
        ]
        assert http.get("/v1/images/good0.png").status_code == 404  # indexed, not kept
        assert http.get("/health").json()["collection"]["rows"] == 3


def test_health_metrics_and_openapi(http, collection):
    health = http.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["triton"]["ready"] is True
    assert body["collection"]["rows"] == len(collection) and body["collection"]["version"] >= 1

    def count(text: str, route: str) -> float:
        labels = f'method="POST",route="{re.escape(route)}",status="200"'
        pattern = rf"edje_api_requests_total{{{labels}}} (\S+)"
        match = re.search(pattern, text)
        return float(match.group(1)) if match else 0.0

    before = count(http.get("/metrics").text, "/v2/rerank")
    for _ in range(3):
        http.post("/v2/rerank", json={"query": QUERY, "documents": collection.ids()[:2]})
    http.post("/v2/rerank", json={"query": QUERY, "documents": ["missing"]})
    metrics = http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert count(metrics.text, "/v2/rerank") == before + 3
    assert 'edje_api_errors_total{route="/v2/rerank",status="400"}' in metrics.text
    assert "edje_api_request_duration_seconds_bucket" in metrics.text
    assert 'edje_api_documents_total{kind="id"}' in metrics.text

    paths = http.get("/openapi.json").json()["paths"]
    for path in ("/v2/rerank", "/v1/rerank", "/rerank", "/v1/search", "/v1/index", "/health"):
        assert path in paths, path
    assert "/v1/images/{image_id}" in paths and "/metrics" in paths
    assert "multipart/form-data" in paths["/v1/index"]["post"]["requestBody"]["content"]
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_stored_ids_go_through_the_token_bank(tiny_source, collection_path, collection, tmp_path):
    repo = build_repository(
        tiny_source, tmp_path / "repo", RepoSettings(token_bank=str(collection_path))
    )
    with (
        TritonServer(
            repo, http_port=0, grpc_port=0, metrics_port=0, log_file=tmp_path / "log"
        ) as server,
        running_api(ApiSettings(str(collection_path), url=server.grpc_url, port=0)) as api,
        httpx.Client(base_url=api.url, timeout=TIMEOUT) as http,
        EDJEClient(server.grpc_url) as client,
    ):
        assert client.bank_holds(collection)
        ids = collection.ids()[::2]
        expected = client.rerank_collection(QUERY, collection, ids, return_probabilities=True)
        before = _by_id_requests(server.grpc_url)
        results = http.post("/v2/rerank", json={"query": QUERY, "documents": ids}).json()["results"]
        assert _by_id_requests(server.grpc_url) == before + 1  # row numbers, not tokens
        assert [(r["index"], r["relevance_score"]) for r in results] == [
            (e.index, e.score) for e in expected
        ]


def _by_id_requests(url: str) -> int:
    admin = grpcclient.InferenceServerClient(url)
    stats = admin.get_inference_statistics("edje_rank_by_id", as_json=True)["model_stats"][0]
    admin.close()
    return int(stats["inference_stats"].get("success", {}).get("count", 0))


class SheddingClient(EDJEClient):
    """A real client whose scoring calls fail as Triton's load shedding makes them fail."""

    def score(self, *args, **kwargs):
        raise ServerError("Exceeds maximum queue size", "StatusCode.UNAVAILABLE")


def test_shed_load_is_429_and_a_down_triton_is_503(triton_server, collection_path, collection):
    body = {"query": QUERY, "documents": collection.ids()[:2]}
    shedding = settings(triton_server, collection_path)
    with (
        running_api(shedding, app=_app(shedding, SheddingClient)) as server,
        httpx.Client(base_url=server.url, timeout=TIMEOUT) as http,
    ):
        answer = http.post("/v2/rerank", json=body)
        assert answer.status_code == 429 and answer.headers["retry-after"] == "1"
        assert "overloaded" in answer.json()["detail"]
    down = settings(triton_server, collection_path, url=f"127.0.0.1:{find_free_port()}")
    with (
        running_api(down) as server,
        httpx.Client(base_url=server.url, timeout=TIMEOUT) as http,
    ):
        answer = http.post("/v2/rerank", json=body)
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert "unreachable" in answer.json()["detail"]
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"


def _app(api_settings, factory):
    from edje_client.api.app import create_app

    return create_app(api_settings, client_factory=factory)


def test_api_command_settings(monkeypatch):
    parser = build_parser()
    monkeypatch.setenv("EDJE_API_KEY", "from-env")
    args = parser.parse_args(["api", "--collection", "c/"])
    s = settings_from_args(args)
    assert (s.host, s.port, s.protocol, s.max_documents) == ("127.0.0.1", 8080, "grpc", 1000)
    assert s.api_key == "from-env" and "from-env" not in repr(s)
    args = parser.parse_args(["api", "--collection", "c/", "--api-key", "k", "--port", "9"])
    assert settings_from_args(args).api_key == "k"
