"""Shared fixtures: a tiny model source, a built repository, and a real Triton server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROTOCOLS = ("http", "grpc")


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory: pytest.TempPathFactory):
    """A tiny EDJE model source (random weights, published 64x384 token format)."""
    from edje.tiny import make_tiny_source

    return make_tiny_source(tmp_path_factory.mktemp("tiny_source"), seed=0)


@pytest.fixture(scope="session")
def tiny_models(tiny_source):
    """(indexing model, ranking model) loaded from the tiny source's checkpoint."""
    indexing, _ = tiny_source.build_indexing_model()
    ranking, _ = tiny_source.build_ranking_model()
    return indexing, ranking


@pytest.fixture(scope="session")
def repo_dir(tiny_source, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository built for the embedded (python) runtime."""
    from edje.build_repo import RepoSettings, build_repository

    out = tmp_path_factory.mktemp("repo") / "model_repository"
    # A longer queue delay than the default makes concurrent test requests batch reliably.
    settings = RepoSettings(rank_queue_delay_us=20_000, index_queue_delay_us=20_000)
    return build_repository(tiny_source, out, settings)


@pytest.fixture(scope="session")
def triton_server(repo_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The real tritonserver on free loopback ports, stopped after the session."""
    from edje_client.server import TritonServer

    log = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    server = TritonServer(repo_dir, http_port=0, grpc_port=0, metrics_port=0, log_file=log)
    with server:
        yield server
    assert server.process is not None and server.process.returncode is not None


@pytest.fixture(params=PROTOCOLS)
def protocol(request: pytest.FixtureRequest) -> str:
    return request.param
