"""Errors as RFC 9457 problem details: one JSON shape (``application/problem+json``) for every failure.

``type`` is a stable URN per kind of problem, ``title`` a short summary, ``detail`` this occurrence, and
``field`` / ``code`` the request field at fault and the pipeline's reason code where there is one (the
same codes the gatekeeper puts on a REJECTED completion).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from plumbing.errors import DeliveryError, ValidationError

log = logging.getLogger(__name__)
MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    """An HTTP failure to answer with a problem document."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        field: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail
        self.field, self.code, self.headers = field, code, headers or {}

    def body(self) -> dict[str, Any]:
        """The problem details document (RFC 9457), with ``field`` and ``code`` where they are known."""
        slug = self.code.lower().replace("_", "-") if self.code else self.title.lower().replace(" ", "-")
        doc: dict[str, Any] = {
            "type": f"urn:aigc:problem:{slug}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.field is not None:
            doc["field"] = self.field
        if self.code is not None:
            doc["code"] = self.code
        return doc

    def response(self) -> JSONResponse:
        """The problem as an ``application/problem+json`` response with its status and headers."""
        return JSONResponse(self.body(), status_code=self.status, media_type=MEDIA_TYPE, headers=self.headers)

    def raw(self) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """The problem as `response` sends it, for a pure ASGI sender: (body, headers)."""
        body = json_bytes(self.body())
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        headers += [(b"content-length", str(len(body)).encode()), (b"content-type", MEDIA_TYPE.encode())]
        return body, headers


_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def json_bytes(content: Any) -> bytes:
    """``content`` as Starlette's JSONResponse renders it (compact UTF-8, no NaN)."""
    return _ENCODER.encode(content).encode()


def problem_for(exc: Exception) -> Problem:
    """The problem an exception raised while serving a request is answered with: a Problem as it is, a
    ValidationError a 400 naming the field, an unacknowledged produce a 503, a ValueError (a body that is
    not JSON) a 400, anything else a logged 500. The handlers `install_problem_handlers` adds use it, and
    so does the submit fast path (`producers.gateway.submit`), which answers outside FastAPI's handlers."""
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, ValidationError):
        return Problem(400, "Invalid generation request", str(exc), field=exc.field, code=exc.code)
    if isinstance(exc, DeliveryError):
        log.warning("gateway: %s", exc)
        return Problem(503, "Kafka did not acknowledge", str(exc), headers={"Retry-After": "1"})
    if isinstance(exc, ValueError):  # json.loads of a broken body
        return Problem(400, "Malformed body", f"the body is not JSON: {str(exc)[:200]}", field="body")
    log.error("gateway: unexpected error", exc_info=exc)
    return Problem(500, "Internal error", f"{type(exc).__name__}: the gateway's log has the trace")


def install_problem_handlers(app: FastAPI) -> None:
    """Make ``app`` answer every error as problem details: Problems as they are, ValidationError as a 400
    naming the field, an unacknowledged produce as a 503, anything unexpected as a logged 500."""

    @app.exception_handler(Problem)
    @app.exception_handler(ValidationError)
    @app.exception_handler(ValueError)
    @app.exception_handler(DeliveryError)
    @app.exception_handler(Exception)
    async def _problem(_: Request, exc: Exception) -> JSONResponse:
        return problem_for(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _unparsed(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "header", "path")]
        field = ".".join(loc) or "body"
        detail = f"{field}: {first.get('msg', 'is not valid')}"
        return Problem(
            400,
            "Invalid generation request",
            detail,
            field=field,
            code=f"INVALID_{field.upper().replace('.', '_')}",
        ).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return Problem(exc.status_code, str(exc.detail), str(exc.detail)).response()
