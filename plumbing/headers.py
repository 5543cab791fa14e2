"""Headers every pipeline message carries: W3C ``traceparent``, ``request_id`` and ``tenant_id``.

A stage continues the trace of the message it consumed (same trace id, a new span id: its own span's
when it records spans), so one request can be followed across topics by its trace id.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# Kafka headers as produced: confluent-kafka accepts str or bytes values.
Headers = list[tuple[str, str | bytes | None]]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message a stage will produce: what every stage hands its transactional producer."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers
    partition: int | None = None  # None: the key's partition


TRACEPARENT = "traceparent"
# On a decision (aigc.decisions) whose request named a reply topic that passed validation: where the
# sink also sends the Completion.
REPLY_TOPIC = "aigc.reply_topic"
# On a message the retry relay sent back to its topic: attempts made so far (the failed ones) and when the
# first one failed, both as ASCII integers. Absent on a first attempt.
ATTEMPTS = "aigc.attempts"
FIRST_FAILED_AT = "aigc.first_failed_at"
# On a message `aigc dlq replay` sent back: the dead letter it came from (topic:partition:offset).
REPLAYED_FROM = "aigc.replayed_from"
# On a message the relay or `aigc dlq replay` sent back: topic:partition:offset where it was first
# consumed, kept across any number of round trips. Stages identify an input by it (the gatekeeper's
# redelivery check, the sink's decided_by), so a retried input is still the same input.
ORIGIN = "aigc.origin"
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


# Trace and span ids need to be unique, not secret: a PRNG avoids a getrandom syscall per message.
_ids = random.Random()


def _hex(bits: int) -> str:
    return f"{_ids.getrandbits(bits):0{bits // 4}x}"


def new_traceparent() -> str:
    """A W3C ``traceparent`` for a new trace: random trace and span ids, sampled."""
    return f"00-{_hex(128)}-{_hex(64)}-01"


# Set by `plumbing.tracing.setup` when spans are recorded: the current span's traceparent if it carries on
# the parent's trace, so outputs name the span that produced them. None (the default): no tracing.
span_traceparent: Callable[[bytes | str | None], str | None] | None = None


def child_traceparent(parent: bytes | str | None) -> str:
    """The traceparent of an output made while handling a message with traceparent ``parent``: the
    current span's when one is recorded (`plumbing.tracing`), else a new span id in the parent's trace,
    or a new trace when the parent is missing or malformed."""
    if span_traceparent is not None:
        own = span_traceparent(parent)
        if own is not None:
            return own
    text = parent.decode("ascii", "replace") if isinstance(parent, bytes) else parent
    match = _TRACEPARENT.fullmatch(text or "")
    if not match or match.group(1) == "0" * 32:
        return new_traceparent()
    return f"00-{match.group(1)}-{_hex(64)}-{match.group(3)}"


def trace_id(traceparent: bytes | str | None) -> str | None:
    """The trace id of a W3C ``traceparent``; None when there is none or it is malformed."""
    text = traceparent.decode("ascii", "replace") if isinstance(traceparent, bytes) else traceparent
    match = _TRACEPARENT.fullmatch(text or "")
    return match.group(1) if match else None


def pipeline_headers(request_id: str, tenant_id: str, traceparent: str) -> Headers:
    """The headers a request's messages start with: its traceparent, request id and tenant id."""
    return [
        (TRACEPARENT, traceparent.encode()),
        ("request_id", request_id.encode()),
        ("tenant_id", tenant_id.encode()),
    ]


def continue_headers(consumed: Mapping[str, bytes | None], request_id: str, tenant_id: str) -> Headers:
    """Headers for a message produced while handling ``consumed`` (its headers as a dict)."""
    return pipeline_headers(request_id, tenant_id, child_traceparent(consumed.get(TRACEPARENT)))
