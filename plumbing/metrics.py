"""Metrics more than one stage records: failed work routed to retry and dead-letter topics, and storage
operations (S3 from renderers and the assembler, Cassandra from the assembler).

Every function here is a no-op while metrics are off (`observability.enabled`). Labels are bounded:
stages and topics come from the topic registry, reasons are error codes, operations are S3 API names
or the assembler store's method names.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import Counter, Histogram

from plumbing.observability import LATENCY_BUCKETS, enabled

ROUTED = Counter(
    "aigc_messages_routed",
    "Messages sent to a retry topic, a dead-letter topic, or back to their topic by the relay",
    ["stage", "topic", "reason"],
)
DEAD_LETTERS = Counter(
    "aigc_dead_letters", "Messages dead-lettered, by stage and error code", ["stage", "reason"]
)
STORAGE_SECONDS = Histogram(
    "aigc_storage_operation_seconds",
    "Latency of one storage call, retries inside the client included",
    ["backend", "operation"],
    buckets=LATENCY_BUCKETS,
)
STORAGE_ERRORS = Counter(
    "aigc_storage_errors", "Storage calls that raised, by backend and operation", ["backend", "operation"]
)
MAX_REASON_CHARS = 64  # error codes are short identifiers; anything longer is not one

F = TypeVar("F", bound=Callable[..., Any])


def _reason(code: str) -> str:
    return code if len(code) <= MAX_REASON_CHARS else "other"


def routed(stage: str, topic: str, reason: str) -> None:
    """One message sent to ``topic`` (a retry or dead-letter topic, or the relay's way back)."""
    if enabled():
        ROUTED.labels(stage, topic, _reason(reason)).inc()


def dead_lettered(stage: str, topic: str, reason: str) -> None:
    """One dead letter produced to ``topic``."""
    if enabled():
        DEAD_LETTERS.labels(stage, _reason(reason)).inc()
        ROUTED.labels(stage, topic, _reason(reason)).inc()


def storage_call(backend: str, operation: str, seconds: float, failed: bool) -> None:
    """Count one storage call (S3 or Cassandra) and its duration, and its failure if it failed."""
    if enabled():
        STORAGE_SECONDS.labels(backend, operation).observe(seconds)
        if failed:
            STORAGE_ERRORS.labels(backend, operation).inc()


def timed_storage(backend: str, operation: str) -> Callable[[F], F]:
    """Decorate a storage method: its latency and failures as ``operation`` of ``backend``."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not enabled():
                return fn(*args, **kwargs)
            started = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            except BaseException:
                storage_call(backend, operation, time.perf_counter() - started, True)
                raise
            storage_call(backend, operation, time.perf_counter() - started, False)
            return result

        return wrapper  # type: ignore[return-value]

    return decorate


def time_future(backend: str, operation: str, future: Any) -> Any:
    """Time an asynchronous Cassandra call (a ``ResponseFuture``) from now until it ends; returns it."""
    if not enabled():
        return future
    started = time.perf_counter()
    future.add_callbacks(
        lambda _rows: storage_call(backend, operation, time.perf_counter() - started, False),
        lambda _exc: storage_call(backend, operation, time.perf_counter() - started, True),
    )
    return future


def instrument_s3(client: Any) -> None:
    """Time every call of a boto3 S3 client by its API name (PutObject, GetObject, ...), through botocore's
    own events: ``before-call`` and ``after-call`` bracket the whole call, its retries included, and
    ``after-call-error`` ends one that raised."""
    started: dict[int, tuple[float, str]] = {}  # id(request context) -> (start, API name)

    def before(context: dict[str, Any], model: Any, **_: Any) -> None:
        started[id(context)] = (time.perf_counter(), model.name)

    def finish(context: dict[str, Any], failed: bool) -> None:
        begun = started.pop(id(context), None)
        if begun is not None:
            storage_call("s3", begun[1], time.perf_counter() - begun[0], failed)

    def after(context: dict[str, Any], model: Any, http_response: Any = None, **_: Any) -> None:
        # A HEAD that finds nothing (404) answers a question (`exists`); it is not a failure.
        status = getattr(http_response, "status_code", 200)
        finish(context, failed=status >= 400 and not (status == 404 and model.name.startswith("Head")))

    def error(context: dict[str, Any], **_: Any) -> None:
        finish(context, failed=True)

    events = client.meta.events
    events.register("before-call.s3", before)
    events.register("after-call.s3", after)
    events.register("after-call-error.s3", error)
