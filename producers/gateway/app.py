"""The HTTP API: submit, look up, stream, cancel and list generations, for the tenant an API key names.

Every route but the console's files and ``/docs`` needs ``Authorization: Bearer <key>``; the tenant comes
from the key, never from the body. A request of another tenant is answered 404, exactly as an unknown one,
so ids cannot be probed. Errors are RFC 9457 problem details (``application/problem+json``) with the
field at fault where there is one.
"""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from plumbing.clock import now_ms
from producers.gateway.backend import Backend
from producers.gateway.keys import ApiKey
from producers.gateway.middleware import LimitAndMeasure
from producers.gateway.problems import Problem, install_problem_handlers
from producers.gateway.requests import (
    Position,
    RateLimiter,
    completion_json,
    decode_cursor,
    encode_cursor,
    previous_month,
    progress_total,
    status_json,
)
from producers.gateway.submit import PATH as SUBMIT_PATH
from producers.gateway.submit import Submissions, authenticate
from schemas.records import CancelRequest, Completion

CONSOLE = Path(__file__).resolve().parent / "console"
HISTORY_MONTHS = 12  # how far back GET /v1/generations looks


class VideoBody(BaseModel):
    """The ``video`` object of POST /v1/generations (documentation, as `GenerationBody`)."""

    num_frames: int = Field(description="frames in the clip, 2 to the deployment's maximum")
    fps: int = Field(8, description="frames per second")
    prompt_end: str | None = Field(None, description="prompt of the last frame")
    seed_end: int | None = None


class GenerationBody(BaseModel):
    """What POST /v1/generations takes (documentation: the body is checked by the pipeline's own rules)."""

    prompt: str
    negative_prompt: str | None = None
    model: str | None = Field(None, description="a model of the registry; default: the first")
    width: int = 64
    height: int = 64
    steps: int = 20
    guidance_scale: float = 7.5
    seed: int | None = None
    num_images: int = 1
    video: VideoBody | None = Field(None, description="makes it a VIDEO request")
    output_format: str | None = Field(None, description="PNG or JPEG for images, MP4 for videos")
    scheduler: str | None = None
    priority: str = Field("NORMAL", description="HIGH, NORMAL or LOW")
    deadline_ms: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    webhook_url: str | None = Field(None, description="where the completion is POSTed, signed")


class Accepted(BaseModel):
    """The 202 answer to POST /v1/generations: the request's id and where to follow it."""

    id: str
    status_url: str
    events_url: str


class GatewayApp(FastAPI):
    """The gateway's FastAPI application, with POST /v1/generations served before FastAPI's stack by
    `Submissions` (a pure ASGI app: see producers/gateway/submit.py)."""

    def __init__(self, submissions: Submissions, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.submissions = submissions

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Serve one ASGI scope: a submission by `Submissions`, anything else by FastAPI."""
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == SUBMIT_PATH:
            await self.submissions(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(backend: Backend) -> FastAPI:
    """The gateway's FastAPI application over ``backend``: the /v1 routes, the ops routes and the console."""
    settings = backend.settings
    gw = settings.gateway
    models = list(settings.models)
    submissions = Submissions(backend, RateLimiter(gw.rate_per_s, gw.rate_burst))
    app = GatewayApp(
        submissions,
        title="aigc gateway",
        version="1",
        description="Submit image and video generations, follow them live, fetch the results.",
        docs_url="/docs",
    )
    install_problem_handlers(app)

    app.add_middleware(LimitAndMeasure, max_body_bytes=gw.max_body_bytes)

    async def tenant_key(authorization: Annotated[str | None, Header()] = None) -> ApiKey:
        return await authenticate(backend, authorization)

    Key = Annotated[ApiKey, Depends(tenant_key)]

    async def owned(request_id: str, key: ApiKey) -> tuple[Any, Any]:
        """(gateway row, terminal row) of a request ``key``'s tenant owns; 404 otherwise."""
        with contextlib.suppress(Exception):  # logged by the writer; the terminal row may still say
            await backend.written(request_id)
        mine, terminal = await asyncio.gather(
            backend.gateway_row(request_id), backend.terminal_row(request_id)
        )
        owner = mine.tenant_id if mine is not None else terminal.tenant_id if terminal is not None else None
        if owner != key.tenant_id:
            raise Problem(404, "No such generation", f"no generation {request_id[:64]!r} for this key")
        return mine, terminal

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/console/")

    @app.post(
        "/v1/generations",
        status_code=202,
        response_model=Accepted,
        responses={400: {}, 401: {}, 413: {}, 429: {}},
        # The body is checked by the pipeline's own rules (plumbing/validation.py), as the gatekeeper and
        # the SDK check it; the model only documents it.
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": GenerationBody.model_json_schema(
                            ref_template="#/components/schemas/{model}"
                        )
                    }
                },
            }
        },
    )
    async def submit(
        request: Request,
        idempotency_key: Annotated[str | None, Header()] = None,
        authorization: Annotated[str | None, Header()] = None,
    ) -> Response:
        """Validate and queue a generation; 202 with its id and a Location to poll."""
        # GatewayApp serves this path without FastAPI's routing, by Submissions; this route documents it
        # in the OpenAPI schema and answers the same, through the same code.
        host = request.headers.get("host")
        base = submissions.base_url(request.scope, host.encode("latin-1") if host is not None else None)
        body, headers = await submissions.accept(authorization, idempotency_key, request.body, base)
        response = Response(body, status_code=202)
        response.raw_headers = headers
        return response

    @app.get("/v1/generations/{request_id}")
    async def get_generation(request_id: str, key: Key) -> dict[str, Any]:
        """State, progress, timings and outputs (with freshly presigned URLs)."""
        mine, terminal = await owned(request_id, key)
        total = progress_total(mine.frames, mine.steps) if mine is not None else 0
        if terminal is not None and terminal.status:
            return {
                "id": request_id,
                "state": terminal.status,
                "kind": terminal.kind,
                "prompt": terminal.prompt,
                "reason_code": terminal.reason_code,
                "message": terminal.message,
                "progress": {"done": total or None, "total": total or None},
                "timings": {
                    "queued_ms": terminal.queued_ms,
                    "render_ms": terminal.render_ms,
                    "assemble_ms": terminal.assemble_ms,
                    "total_ms": terminal.total_ms,
                },
                "created_at": _iso(terminal.created_at),
                "finished_at": _iso(terminal.finished_at),
                "outputs": backend.presigned_outputs(terminal),
            }
        live = backend.live_state(request_id)
        return {
            "id": request_id,
            "state": live.state if live else "SUBMITTED",
            "kind": mine.kind,
            "prompt": mine.prompt,
            "stage": live.stage if live else None,
            "progress": {
                "done": live.done if live else 0,
                "total": (live.request_total if live else 0) or total,
            },
            "created_at": _iso(mine.created_at),
            "outputs": [],
        }

    @app.get(
        "/v1/generations/{request_id}/events",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def events(
        request_id: str, key: Key, last_event_id: Annotated[str | None, Header()] = None
    ) -> StreamingResponse:
        """Server-Sent Events from the status topic until the completion; reconnect with Last-Event-ID to
        resume where the stream stopped."""
        mine, terminal = await owned(request_id, key)
        resume = Position.parse(last_event_id) if last_event_id else None
        created = (mine or terminal).created_at
        created_ms = int(created.replace(tzinfo=UTC).timestamp() * 1000) if created else now_ms()

        if not backend.streams.acquire(blocking=False):
            raise Problem(
                503,
                "Too many event streams",
                f"{gw.max_streams} are open; poll GET instead",
                headers={"Retry-After": "5"},
            )

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for chunk in frames():
                    yield chunk
            finally:
                backend.streams.release()

        async def frames() -> AsyncIterator[bytes]:
            yield b"retry: 1000\n\n"
            async for item in backend.events(request_id, created_ms, resume, gw.sse_keepalive_s):
                if item is None:
                    yield b": keep-alive\n\n"
                    continue
                if isinstance(item.record, Completion):
                    kind = "completion"
                    row = await backend.terminal_row(request_id)
                    payload = completion_json(item.record, backend.presigned_outputs(row) if row else None)
                else:
                    kind = "status"
                    payload = status_json(item.record, item.done, item.request_total)
                data = json.dumps(payload, default=str, separators=(",", ":"))
                yield f"id: {item.position}\nevent: {kind}\ndata: {data}\n\n".encode()

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/v1/generations/{request_id}/cancel", status_code=202)
    async def cancel(request_id: str, key: Key) -> dict[str, Any]:
        """Ask every stage to stop work on the request; it ends CANCELLED unless already finished."""
        _, terminal = await owned(request_id, key)
        if terminal is not None and terminal.status:
            raise Problem(409, "Already finished", f"{request_id} ended {terminal.status}")
        record = CancelRequest(
            request_id=request_id,
            tenant_id=key.tenant_id,
            reason="cancelled over HTTP",
            requested_at=now_ms(),
        )
        value = backend.codec.write(record)
        await backend.produce(backend.topics.cancellations, value, request_id, request_id, key.tenant_id)
        return {"id": request_id, "state": "CANCEL_REQUESTED"}

    @app.get("/v1/generations")
    async def history(
        key: Key,
        cursor: str | None = None,
        limit: Annotated[int | None, Query(ge=1, le=200)] = None,
        outputs: bool = True,
    ) -> dict[str, Any]:
        """The tenant's finished generations, newest first; ``next_cursor`` fetches the next page."""
        size = limit or gw.page_size
        if cursor:
            month, before_ms, after_id = decode_cursor(cursor)
        else:
            now = datetime.now(UTC)
            month, before_ms, after_id = f"{now:%Y-%m}", int(now.timestamp() * 1000) + 3_600_000, ""
        items: list[dict[str, Any]] = []
        for _ in range(HISTORY_MONTHS):
            before = datetime.fromtimestamp(before_ms / 1000, UTC)
            rows = await backend.history(key.tenant_id, month, before, size + 50)
            for row in rows:
                created_ms = int(row.created_at.replace(tzinfo=UTC).timestamp() * 1000)
                if created_ms == before_ms and row.request_id <= after_id:
                    continue  # on the previous page (ties on created_at go by request id)
                items.append(
                    {
                        "id": row.request_id,
                        "month": month,
                        "created_ms": created_ms,
                        "kind": row.kind,
                        "model": row.model,
                        "state": row.status,
                        "created_at": _iso(row.created_at),
                        "finished_at": _iso(row.finished_at),
                    }
                )
                if len(items) > size:
                    break
            if len(items) > size:
                break
            month, before_ms, after_id = previous_month(month), 1 << 45, ""
        page, more = items[:size], len(items) > size
        if outputs:
            for item in page:
                row = await backend.terminal_row(item["id"])
                item["outputs"] = backend.presigned_outputs(row) if row is not None else []
        last = page[-1] if page else None
        next_cursor = encode_cursor(last["month"], last["created_ms"], last["id"]) if more and last else None
        for item in page:
            item.pop("month"), item.pop("created_ms")
        return {"items": page, "next_cursor": next_cursor}

    @app.get("/v1/whoami")
    async def whoami(key: Key) -> dict[str, Any]:
        """The tenant and key id the presented key stands for."""
        return {
            "tenant_id": key.tenant_id,
            "key_id": key.key_id,
            "operator": key.operator,
            "models": models,
            "limits": {
                "max_size": settings.limits.max_size,
                "max_steps": settings.limits.max_steps,
                "max_frames": settings.limits.max_frames,
            },
        }

    from producers.gateway.ops import add_ops_routes

    add_ops_routes(app, backend, tenant_key)
    app.mount("/console", StaticFiles(directory=CONSOLE, html=True), name="console")
    return app


def _iso(value: datetime | None) -> str | None:
    return value.replace(tzinfo=UTC).isoformat() if value is not None else None
