"""Locust user for EDJE's HTTP API (``edje api``): Cohere-shaped re-ranking of stored images.

``ApiRerankUser`` first asks ``POST /v1/search`` (first stage only) for K ids of the collection,
then sends ``POST /v2/rerank`` with the query and those K ids, as a search or RAG stack would.
Each successful request also reports K events under the name ``pairs``, so locust's RPS column
for that row reads directly as pairs/s.

Settings (environment): ``EDJE_K`` (default 10), ``EDJE_QUERY`` and ``EDJE_API_KEY`` (sent as
``Authorization: Bearer`` when set). The target is locust's ``--host``
(``http://127.0.0.1:8080``)::

    locust -f loadtest/api_locustfile.py --headless -u 8 -t 30s --host http://127.0.0.1:8080
"""

from __future__ import annotations

import os

from locust import HttpUser, between, events, task

K = int(os.environ.get("EDJE_K", "10"))
QUERY = os.environ.get("EDJE_QUERY", "a red circle left of a blue square")
API_KEY = os.environ.get("EDJE_API_KEY", "")


class ApiRerankUser(HttpUser):
    """One query against K stored images per request, through ``/v2/rerank``."""

    wait_time = between(0.0, 0.0)

    def on_start(self) -> None:
        self.headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
        response = self.client.post(
            "/v1/search",
            json={"query": QUERY, "k": K, "rerank_top_k": 0},
            headers=self.headers,
            name="/v1/search (setup)",
        )
        response.raise_for_status()
        self.ids = [hit["id"] for hit in response.json()["hits"]]
        if not self.ids:
            raise RuntimeError("the API's collection is empty: index some images first")

    @task
    def rerank(self) -> None:
        body = {"model": "edje", "query": QUERY, "documents": self.ids, "top_n": 3}
        with self.client.post(
            "/v2/rerank",
            json=body,
            headers=self.headers,
            name=f"/v2/rerank K={len(self.ids)}",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return
            response.success()
            elapsed_ms = response.elapsed.total_seconds() * 1e3
        for _ in self.ids:
            events.request.fire(
                request_type="HTTP",
                name="pairs",
                response_time=elapsed_ms,
                response_length=0,
                exception=None,
                context={},
            )
