"""The gateway's one ASGI middleware: refuse a body over ``gateway.max_body_bytes`` before it is read
(413, by its Content-Length; a chunked body is measured once read, in the route), and time every answer
by method, route template and status code (``aigc_gateway_request_seconds``). Pure ASGI, so a streamed
response (the event streams) passes through untouched.
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
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                detail = f"the body is {int(value)} bytes, more than {self.max_body_bytes}"
                await Problem(413, "Request body too large", detail).response()(scope, receive, send)
                return
        status = ["500"]

        async def timed_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
                if enabled():
                    method = scope["method"] if scope["method"] in METHODS else "other"
                    route = getattr(scope.get("route"), "path", "other")  # a template: a bounded label
                    HTTP_SECONDS.labels(method, route, status[0]).observe(time.perf_counter() - began)
            await send(message)

        await self.app(scope, receive, timed_send)
