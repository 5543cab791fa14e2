"""The gateway's one ASGI middleware: refuse a body over ``gateway.max_body_bytes`` before it is read
(413, by its Content-Length; a chunked body is measured once read, in the route), and time every answer
by method, route template and status code (``aigc_gateway_request_seconds``). Pure ASGI, so a streamed
response (the event streams) passes through untouched. The submit fast path (`producers.gateway.submit`)
does the same with `oversized` and `observe`.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Histogram

from plumbing.observability import LATENCY_BUCKETS, enabled
from producers.gateway.problems import Problem

HTTP_SECONDS = Histogram(
    "aigc_gateway_request_seconds",
    "HTTP requests the gateway answered (to the first byte of the body), by method, route and status code",
    ["method", "route", "code"],
    buckets=(0.001, 0.002, *LATENCY_BUCKETS),
)
METHODS = frozenset({"GET", "POST", "HEAD", "OPTIONS"})
_children: dict[tuple[str, str, int], Any] = {}  # labelled histograms, looked up once per label set


def observe(method: str, route: str, status: int, began: float) -> None:
    """Count one answer in ``aigc_gateway_request_seconds`` (``route``: a template, a bounded label)."""
    if not enabled():
        return
    labels = (method if method in METHODS else "other", route, status)
    child = _children.get(labels)
    if child is None:
        child = _children[labels] = HTTP_SECONDS.labels(labels[0], route, str(status))
    child.observe(time.perf_counter() - began)


def oversized(content_length: bytes | None, max_body_bytes: int) -> Problem | None:
    """The 413 for a Content-Length over ``max_body_bytes``; None for a body that may be read."""
    if content_length is not None and content_length.isdigit() and int(content_length) > max_body_bytes:
        detail = f"the body is {int(content_length)} bytes, more than {max_body_bytes}"
        return Problem(413, "Request body too large", detail)
    return None


class LimitAndMeasure:
    """ASGI middleware: refuses a body whose Content-Length is over ``max_body_bytes`` (413) and times
    every HTTP response by method, route template and status code."""

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Handle one ASGI connection: refuse an announced oversized body, else pass it on, timed."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        length = next((value for name, value in scope["headers"] if name == b"content-length"), None)
        refused = oversized(length, self.max_body_bytes)
        if refused is not None:
            await refused.response()(scope, receive, send)
            return

        async def timed_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", "other")  # a template: a bounded label
                observe(scope["method"], route, message["status"], began)
            await send(message)

        await self.app(scope, receive, timed_send)
