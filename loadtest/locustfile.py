"""Locust users for EDJE on Triton, built on tritonclient (HTTP or gRPC).

* ``RankUser`` sends ``edje_rank`` requests shaped like real re-ranking: one query and K candidate
  token blocks (``EDJE_K``, default 10).
* ``IndexUser`` sends ``edje_index`` requests with one generated PNG each.

Besides requests/s and latency percentiles, each rank request also reports K events under the
name ``pairs``, so locust's RPS column for that row reads directly as pairs/s.

Settings (environment): ``EDJE_PROTOCOL`` (grpc|http, default grpc) and ``EDJE_K``. Choose the
users on locust's command line (``locust -f loadtest/locustfile.py RankUser IndexUser``). The
target is locust's ``--host`` (``host:port`` of the chosen protocol).
"""

from __future__ import annotations

import io
import os
import time

import numpy as np
from locust import User, between, events, task

PROTOCOL = os.environ.get("EDJE_PROTOCOL", "grpc")
if PROTOCOL == "grpc":
    import grpc.experimental.gevent as grpc_gevent

    grpc_gevent.init_gevent()  # grpcio must cooperate with locust's gevent loop
    import tritonclient.grpc as triton
else:
    import tritonclient.http as triton

from PIL import Image  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

K = int(os.environ.get("EDJE_K", "10"))


def _strip_scheme(host: str) -> str:
    return host.split("://", 1)[-1].rstrip("/")


class TritonUser(User):
    """A user holding one tritonclient connection; reports each call to locust."""

    abstract = True
    wait_time = between(0.0, 0.0)

    def on_start(self) -> None:
        self.client = triton.InferenceServerClient(_strip_scheme(self.host))
        if PROTOCOL == "grpc":
            config = self.client.get_model_config("edje_rank", as_json=True)["config"]
        else:
            config = self.client.get_model_config("edje_rank")
        dims = next(i for i in config["input"] if i["name"] == "compressed_tokens")["dims"]
        self.token_shape = tuple(int(d) for d in dims)

    def on_stop(self) -> None:
        self.client.close()

    def _call(self, name: str, model: str, inputs: list, pairs: int = 0) -> None:
        start = time.perf_counter()
        exception = None
        try:
            self.client.infer(model, inputs)
        except InferenceServerException as exc:
            exception = exc
        elapsed_ms = (time.perf_counter() - start) * 1e3
        events.request.fire(
            request_type=PROTOCOL,
            name=name,
            response_time=elapsed_ms,
            response_length=0,
            exception=exception,
            context={},
        )
        for _ in range(pairs if exception is None else 0):
            events.request.fire(
                request_type=PROTOCOL,
                name="pairs",
                response_time=elapsed_ms,
                response_length=0,
                exception=None,
                context={},
            )


class RankUser(TritonUser):
    """One query against K candidates per request."""

    def on_start(self) -> None:
        super().on_start()
        rng = np.random.default_rng()
        text = np.array([[b"a red circle left of a blue square"]] * K, dtype=object)
        tokens = rng.standard_normal((K, *self.token_shape)).astype(np.float16)
        self.inputs = [
            triton.InferInput("text", [K, 1], "BYTES"),
            triton.InferInput("compressed_tokens", [K, *self.token_shape], "FP16"),
        ]
        self.inputs[0].set_data_from_numpy(text)
        self.inputs[1].set_data_from_numpy(tokens)

    @task
    def rank(self) -> None:
        self._call(f"edje_rank K={K}", "edje_rank", self.inputs, pairs=K)


class IndexUser(TritonUser):
    """One image per request."""

    def on_start(self) -> None:
        super().on_start()
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng().integers(0, 255, (240, 320, 3), np.uint8)).save(
            buf, "PNG"
        )
        self.inputs = [triton.InferInput("image", [1, 1], "BYTES")]
        self.inputs[0].set_data_from_numpy(np.array([[buf.getvalue()]], dtype=object))

    @task
    def index(self) -> None:
        self._call("edje_index", "edje_index", self.inputs)
