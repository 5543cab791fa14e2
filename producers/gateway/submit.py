"""POST /v1/generations, the gateway's hot path, served as a pure ASGI app.

`GatewayApp` (app.py) hands it every ``POST /v1/generations`` before FastAPI's routing, dependency
injection and middleware stack, which cost more than half of a submission's CPU. The route FastAPI
declares for it documents it in the OpenAPI schema and answers through the same `Submissions.accept`, so
both ways give the same answers: the API key (401), the key's rate (429 with Retry-After), the body's size
(413, by its Content-Length before anything else, or once read), the pipeline's own validation rules (400
naming the field), the produce (202 once the broker has acknowledged; 503 when it did not) and problem
details for every failure (`problems.problem_for`). Timed like every other answer in
``aigc_gateway_request_seconds``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import Request

from plumbing.clock import now_ms
from plumbing.validation import validate_request
from producers.gateway.backend import Backend
from producers.gateway.keys import ApiKey, KeyError_
from producers.gateway.middleware import observe, oversized
from producers.gateway.problems import Problem, json_bytes, problem_for
from producers.gateway.requests import RateLimiter, record_from_body, request_id_for

PATH = "/v1/generations"
_JSON = (b"content-type", b"application/json")


async def authenticate(backend: Backend, authorization: str | None) -> ApiKey:
    """The key an ``Authorization: Bearer <key>`` header presents; a 401 Problem when there is none or it
    is not valid. A key seen within ``key_cache_s`` costs a digest and a dict lookup (no thread hop, no
    query); another is checked against Cassandra on a worker thread."""
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key:
        detail = "send Authorization: Bearer <key>"
        raise Problem(401, "API key required", detail, headers={"WWW-Authenticate": "Bearer"})
    key = key.strip()
    try:
        cached = backend.keys.cached(key)
        if cached is not None:
            return cached
        return await asyncio.to_thread(backend.keys.authenticate, key)
    except KeyError_ as exc:
        raise Problem(401, "Invalid API key", str(exc), headers={"WWW-Authenticate": "Bearer"}) from None


class Submissions:
    """Accepts submissions for one gateway (see the module docstring)."""

    def __init__(self, backend: Backend, limiter: RateLimiter) -> None:
        self.backend = backend
        self.limiter = limiter
        self.settings = backend.settings
        self.gw = backend.settings.gateway
        self.models = list(backend.settings.models)
        self._base_urls: dict[tuple[Any, ...], str] = {}

    async def accept(
        self,
        authorization: str | None,
        idempotency_key: str | None,
        read_body: Callable[[], Awaitable[bytes]],
        base: str,
    ) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """The 202's body and headers for one submission; raises what `problem_for` answers otherwise.
        The key and its rate are checked before the body is read."""
        gw = self.gw
        key = await authenticate(self.backend, authorization)
        wait_s = self.limiter.take(key.key_id)
        if wait_s:
            raise Problem(
                429,
                "Too many requests",
                f"this key may submit {gw.rate_per_s:g} a second",
                headers={"Retry-After": str(max(1, round(wait_s + 0.5)))},
            )
        data = await read_body()
        if len(data) > gw.max_body_bytes:  # a chunked body, which had no Content-Length to refuse it by
            raise Problem(413, "Request body too large", f"the body is more than {gw.max_body_bytes} bytes")
        raw = json.loads(data or b"null")
        now = now_ms()
        backend = self.backend
        record = record_from_body(
            raw,
            tenant_id=key.tenant_id,
            request_id=request_id_for(key.tenant_id, idempotency_key),
            created_at=now,
            default_model=self.models[0],
            schema_fields=backend.schema_fields,
        )
        validate_request(record, self.settings.limits, self.models, None, now)
        value = backend.codec.write(record)
        rid = record.request_id
        backend.record_submission(record)  # a lookup in this process waits for the row (Backend.written)
        topic = backend.topics.requests(record.priority)
        await backend.produce(topic, value, key.tenant_id, rid, key.tenant_id)  # the 202 follows the ack
        body = json_bytes(
            {"id": rid, "status_url": f"{base}{PATH}/{rid}", "events_url": f"{base}{PATH}/{rid}/events"}
        )
        location = f"{PATH}/{rid}".encode("latin-1")
        return body, [(b"location", location), (b"content-length", str(len(body)).encode()), _JSON]

    def base_url(self, scope: MutableMapping[str, Any], host: bytes | None) -> str:
        """Where clients reach the gateway: ``gateway.public_url``, else what the request was sent to
        (as Starlette's ``request.base_url`` says from the scope and its ``host`` header; remembered by
        scheme, host and root path)."""
        if self.gw.public_url:
            return self.gw.public_url.rstrip("/")
        memo = (scope.get("scheme"), scope.get("server"), host, scope.get("root_path"))
        base = self._base_urls.get(memo)
        if base is None:
            base = str(Request(scope).base_url).rstrip("/")
            if len(self._base_urls) > 1000:
                self._base_urls.clear()
            self._base_urls[memo] = base
        return base

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Serve one POST /v1/generations (ASGI)."""
        began = time.perf_counter()
        authorization, idempotency_key, length, host = _headers(scope["headers"])
        limit = self.gw.max_body_bytes
        status = 202
        try:
            refused = oversized(length, limit)
            if refused is not None:
                raise refused
            body, headers = await self.accept(
                authorization, idempotency_key, lambda: _read_body(receive, limit), self.base_url(scope, host)
            )
        except _Disconnected:
            return
        except Exception as exc:  # noqa: BLE001 - every failure is answered as a problem document
            problem = problem_for(exc)
            status = problem.status
            body, headers = problem.raw()
        observe("POST", PATH, status, began)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _headers(raw: list[tuple[bytes, bytes]]) -> tuple[str | None, str | None, bytes | None, bytes | None]:
    """(Authorization, Idempotency-Key, Content-Length, Host) of a request: the first of each, as
    Starlette's ``Headers.get`` reads them."""
    authorization = idempotency_key = None
    length = host = None
    for name, value in raw:
        if name == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
        elif name == b"idempotency-key" and idempotency_key is None:
            idempotency_key = value.decode("latin-1")
        elif name == b"content-length" and length is None:
            length = value
        elif name == b"host" and host is None:
            host = value
    return authorization, idempotency_key, length, host


async def _read_body(receive: Any, limit: int) -> bytes:
    """The request's body, or its first chunks once they are over ``limit`` bytes (enough to refuse it);
    `_Disconnected` when the client goes away first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        if chunk:
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                break
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _Disconnected(Exception):
    """The client went away while its body was read: nothing to answer."""
