"""OpenTelemetry spans for the stages, parented through the ``traceparent`` header of each message.

Each stage records one span per unit of work: ``gatekeeper.admit`` per request, ``renderer.task`` per render
task (its queue wait as an attribute, ``renderer.render``, ``renderer.upload`` and ``renderer.announce``
inside), ``assembler.request`` per request in a sink batch (``assembler.assemble``, ``assembler.store`` and
``assembler.publish`` inside), ``relay.send`` per retried message and ``<stage>.failure`` where a failure is
routed outside any span. Attributes: ``request_id``, ``tenant``, ``priority`` and ``outcome``; a span is not
a metric, so a request id is fine here.

A span is the child of the consumed message's ``traceparent`` (W3C TraceContext), and while it is
current, `plumbing.headers.continue_headers` writes the span's own traceparent on every output, so the
next stage's span is its child and the whole request is one trace.

Spans are exported over OTLP/HTTP (protobuf) only when an endpoint is configured
(``AIGC_OBSERVABILITY__OTLP_ENDPOINT``, else the standard ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_ENDPOINT``); `setup` then builds the SDK once per process, with a batching processor
that exports from its own thread. With none, the SDK is never imported, no span exists and every helper
here is one ``is None`` test: the stage code calls them unconditionally.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from plumbing import headers as _headers
from plumbing.clock import now_ms
from plumbing.headers import ATTEMPTS, TRACEPARENT
from plumbing.settings import Settings
from schemas.records import RenderTask

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
# A consumed message's headers, as the stages hold them: a dict, confluent-kafka's list of pairs, or none.
Carrier = Mapping[str, Any] | Sequence[tuple[str, Any]] | None
TRACES_PATH = "/v1/traces"


class _Process:
    tracer: Tracer | None = None  # set once by `setup` when an endpoint is configured


_lock = threading.Lock()
_propagator = TraceContextTextMapPropagator()
# The span of the unit of work in hand (not of a step inside it): what `annotate` and `failure` address.
_unit: contextvars.ContextVar[Span | None] = contextvars.ContextVar("aigc_unit_span", default=None)


def endpoint(settings: Settings) -> str | None:
    """Where spans go (a full OTLP/HTTP traces URL), or None: no tracing in this process."""
    if settings.observability.otlp_endpoint:
        return settings.observability.otlp_endpoint.rstrip("/") + TRACES_PATH
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + TRACES_PATH
    return None


def setup(settings: Settings, stage: str) -> bool:
    """Build the SDK and its OTLP exporter once for this process if an endpoint is configured; say if so.

    The provider flushes its spans when the process exits normally (the SDK's atexit hook)."""
    url = endpoint(settings)
    if url is None:
        return False
    with _lock:
        if _Process.tracer is not None:
            return True
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create(
            {
                "service.name": f"aigc-{stage}",
                "service.namespace": settings.kafka.topic_prefix,
                "service.instance.id": settings.instance or f"{stage}-{os.getpid()}",
            }
        )
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        trace.set_tracer_provider(provider)
        install(provider.get_tracer("aigc"))
    log.info("%s exports OpenTelemetry spans to %s", stage, url)
    return True


def install(tracer: Tracer | None) -> None:
    """Record spans with ``tracer`` from now on (None: stop); `setup` calls it, tests may too."""
    _Process.tracer = tracer
    _headers.span_traceparent = current_traceparent if tracer is not None else None


def enabled() -> bool:
    """Whether this process records spans (`setup` made a tracer)."""
    return _Process.tracer is not None


# -- spans ------------------------------------------------------------------------------------------
def _header(carrier: Carrier, name: str) -> str | None:
    if not carrier:
        return None
    pairs = carrier.items() if isinstance(carrier, Mapping) else carrier
    found = None
    for key, value in pairs:
        if key == name:
            found = value  # the last one wins, as Kafka clients read headers
    if isinstance(found, bytes):
        return found.decode("ascii", "replace")
    return found


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if v is not None}


@contextlib.contextmanager
def consuming(name: str, carrier: Carrier, start_ms: int | None = None, **attributes: Any) -> Iterator[Span]:
    """A span for one unit of work on a consumed message, current while the block runs: the child of the
    message's ``traceparent`` (a new trace when it has none), with ``request_id`` and ``tenant`` from its
    headers and the given attributes. An exception escaping the block is recorded on the span."""
    if _Process.tracer is None:
        yield INVALID_SPAN
        return
    parent = _propagator.extract({TRACEPARENT: _header(carrier, TRACEPARENT) or ""})
    attempts = _header(carrier, ATTEMPTS)
    base = {
        "request_id": _header(carrier, "request_id"),
        "tenant": _header(carrier, "tenant_id"),
        "retries": int(attempts) if attempts and attempts.isdigit() else None,
    }
    with _Process.tracer.start_as_current_span(
        name,
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes=_clean({**base, **attributes}),
        start_time=start_ms * 1_000_000 if start_ms is not None else None,
    ) as span:
        token = _unit.set(span)
        try:
            yield span
        finally:
            _unit.reset(token)


def step(name: str) -> Callable[[F], F]:
    """Decorate a part of a unit of work: a child span of the current one while it runs (none without)."""

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if _Process.tracer is None or not trace.get_current_span().is_recording():
                return function(*args, **kwargs)
            with _Process.tracer.start_as_current_span(name):
                return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def spanned(name: str, carrier_of: Callable[..., Carrier], **attributes: Any) -> Callable[[F], F]:
    """Decorate a unit of work: `consuming` around it, the carrier taken from its arguments."""

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if _Process.tracer is None:
                return function(*args, **kwargs)
            with consuming(name, carrier_of(*args, **kwargs), **attributes):
                return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def annotate(span: Span | None = None, **attributes: Any) -> None:
    """Set attributes (those not None) on ``span``, or on the span of the unit of work in hand."""
    if _Process.tracer is None:
        return
    target = span or _unit.get()
    if target is not None:
        target.set_attributes(_clean(attributes))


def interval(name: str, start_ms: int, end_ms: int, **attributes: Any) -> None:
    """A child span of the current one that already happened (such as a batch's render, timed elsewhere)."""
    if _Process.tracer is None or not trace.get_current_span().is_recording():
        return
    span = _Process.tracer.start_span(name, start_time=start_ms * 1_000_000, attributes=_clean(attributes))
    span.end(end_time=max(start_ms, end_ms) * 1_000_000)


@contextlib.contextmanager
def render_task(
    task_headers: Carrier, record: RenderTask, started_at: int, **attributes: Any
) -> Iterator[Span]:
    """The span of one render task, from the start of its batch's render: its queue wait (enqueued to
    started) as ``queue_wait_ms``, the render so far as a ``renderer.render`` child span."""
    if _Process.tracer is None:
        yield INVALID_SPAN
        return
    with consuming(
        "renderer.task",
        task_headers,
        start_ms=started_at,
        priority=record.priority,
        task_id=record.task_id,
        attempt=record.attempt,
        frames=record.frame_count,
        queue_wait_ms=max(0, started_at - (record.enqueued_at or started_at)),
        **attributes,
    ) as span:
        interval("renderer.render", started_at, now_ms())
        yield span


def failure(carrier: Carrier, stage: str, outcome: str, topic: str, code: str, exc: BaseException) -> None:
    """A failure routed to a retry topic or a dead letter: recorded on the current span, or on a span of
    its own (``<stage>.failure``) when none is current."""
    if _Process.tracer is None:
        return
    attributes: dict[str, Any] = {"outcome": outcome, "destination": topic, "error_code": code}
    current = _unit.get()
    if current is not None and current.is_recording():
        current.set_attributes(attributes)
        current.record_exception(exc, attributes={"error_code": code})
        return
    with consuming(f"{stage}.failure", carrier, **attributes) as span:
        span.record_exception(exc, attributes={"error_code": code})


def relayed(headers: list[tuple[str, Any]], **attributes: Any) -> list[tuple[str, Any]]:
    """Record the relay sending a retried message back (``relay.send``, child of its traceparent) and
    return its headers with the span's traceparent, so the next attempt is the relay span's child."""
    if _Process.tracer is None:
        return headers
    with consuming("relay.send", headers, outcome="RELAYED", **attributes):
        own = current_traceparent(_header(headers, TRACEPARENT))
    if own is None:
        return headers
    return [(k, v) for k, v in headers if k != TRACEPARENT] + [(TRACEPARENT, own.encode())]


def current_traceparent(parent: bytes | str | None) -> str | None:
    """The traceparent of the current span if it is recording and carries on ``parent``'s trace (or
    started a new trace for a message without a valid one); else None, and headers make their own."""
    span = trace.get_current_span()
    if not span.is_recording():
        return None
    context = span.get_span_context()
    own_trace = f"{context.trace_id:032x}"
    parent_trace = _headers.trace_id(parent)
    if parent_trace is not None and parent_trace != "0" * 32:
        if parent_trace != own_trace:
            return None
    elif getattr(span, "parent", None) is not None:
        return None
    return f"00-{own_trace}-{context.span_id:016x}-{int(context.trace_flags):02x}"
