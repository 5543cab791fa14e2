"""How log records are written: readable text (the default) or one JSON object per line.

``log_format=json`` (``AIGC_LOG_FORMAT=json``) writes each record as JSON through python-json-logger,
with ``time``, ``level``, ``logger``, ``message``, the ``stage`` (the process's instance name, else its
verb) and, where the code handling a message has bound them (`bind_message`), the ``request_id`` and
``trace_id`` of that message. Text stays the default so a terminal stays readable.

Binding uses context variables: each thread and each asyncio task sees only what it bound itself, so a
worker thread handling one request never labels another thread's lines with it. A stage binds at the
top of its per-message work and the binding lasts until the next message replaces it.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Mapping

from pythonjsonlogger.json import JsonFormatter

from plumbing.headers import TRACEPARENT, trace_id

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("aigc_request_id", default=None)
_trace_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("aigc_trace_id", default=None)


def bind(request_id: str | None, traceparent: bytes | str | None = None) -> None:
    """Label this thread's (or task's) next log records with ``request_id`` and the trace's id."""
    _request_id.set(request_id)
    _trace_id.set(trace_id(traceparent) if traceparent else None)


def bind_message(headers: Mapping[str, bytes | str | None] | list[tuple[str, bytes | None]] | None) -> None:
    """`bind` from a message's ``request_id`` and ``traceparent`` headers (absent ones unbind)."""
    pairs = headers.items() if isinstance(headers, Mapping) else (headers or [])
    found: dict[str, bytes | str | None] = {}
    for key, value in pairs:
        if key in ("request_id", TRACEPARENT):
            found[key] = value
    request_id = found.get("request_id")
    bind(request_id.decode("utf-8", "replace") if isinstance(request_id, bytes) else request_id,
         found.get(TRACEPARENT))  # fmt: skip


class ContextFilter(logging.Filter):
    """Adds ``stage`` to every record, and ``request_id`` / ``trace_id`` where bound."""

    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the stage, and the bound request id and trace id, to ``record``; never drops it."""
        record.stage = self.stage
        request_id, trace = _request_id.get(), _trace_id.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        if trace is not None and not hasattr(record, "trace_id"):
            record.trace_id = trace
        return True


def json_formatter() -> logging.Formatter:
    """The formatter of ``log_format=json``: one JSON object a line, with ``level`` and ``logger`` fields."""
    return JsonFormatter(
        "%(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",  # ISO 8601, UTC
    )


def configure_logging(level: int | str, log_format: str, stage: str) -> None:
    """Root logging for a process: ``text`` or ``json`` lines on stderr, with the stage's context.

    As `logging.basicConfig`, it leaves a root logger that already has handlers alone (a test runner's)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(json_formatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(ContextFilter(stage))
    root.addHandler(handler)
    root.setLevel(level)
