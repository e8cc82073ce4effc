"""Prometheus metrics of the API: requests, latency and errors by route, documents scored.

Each app has its own registry (several apps can live in one process, as in the tests). Routes
are labelled by their template (``/v1/images/{image_id:path}``), and every path that matches no
route by one label, so hostile paths cannot grow the label set.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNMATCHED = "<unmatched>"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ApiMetrics:
    """The API's collectors, in a registry of their own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("route", "method")
        self.requests = Counter(
            "edje_api_requests",
            "HTTP requests answered, by route, method and status",
            (*labels, "status"),
            registry=self.registry,
        )
        self.errors = Counter(
            "edje_api_errors",
            "HTTP requests answered with a 4xx or 5xx status, by route and status",
            ("route", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "edje_api_request_duration_seconds",
            "Time from the request's arrival to the end of its answer",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "edje_api_requests_in_flight", "Requests being answered", registry=self.registry
        )
        self.documents = Counter(
            "edje_api_documents",
            "Documents scored by EDJE, by kind (id: stored tokens; image: indexed on the fly)",
            ("kind",),
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


def route_label(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The template of the route ``scope`` goes to (a method mismatch counts), or UNMATCHED."""
    for route in routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return getattr(route, "path", UNMATCHED)
    return UNMATCHED


class MetricsMiddleware:
    """Counts and times every HTTP request, including those the other middlewares refuse."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = list(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_label(self.routes, scope)
        status = 500
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - start)
            self.metrics.requests.labels(route, method, str(status)).inc()
            if status >= 400:
                self.metrics.errors.labels(route, str(status)).inc()


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
