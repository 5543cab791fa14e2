"""The pipeline's error taxonomy: what to do next about a failure (`ErrorKind`), and its ``code``.

It lives at the bottom layer because the codec raises it; `plumbing.errors` re-exports it next to
`plumbing.errors.classify`, which sorts any library's exception into the same kinds.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorKind(StrEnum):
    """What to do next about a failure: retry later, dead-letter now, or pause and wait."""

    RETRYABLE = "retryable"
    PERMANENT = "permanent"
    BACKPRESSURE = "backpressure"


class PipelineError(Exception):
    """Base of the pipeline's own errors; ``kind`` says what to do next, ``code`` names the problem."""

    kind: ErrorKind = ErrorKind.PERMANENT
    code: str = "PIPELINE_ERROR"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    @property
    def retriable(self) -> bool:
        """True when the same work may succeed later."""
        return self.kind is ErrorKind.RETRYABLE


class RetryableError(PipelineError):
    """A transient failure: the same work may succeed later."""

    kind = ErrorKind.RETRYABLE
    code = "TRANSIENT"


class PermanentError(PipelineError):
    """The work can never succeed as it is."""

    kind = ErrorKind.PERMANENT


class BackPressure(PipelineError):
    """Downstream is saturated: pause and resume, do not fail the work."""

    kind = ErrorKind.BACKPRESSURE
    code = "BACKPRESSURE"


class DecodeError(PermanentError):
    """Bytes that are not a valid Avro single-object message of an expected schema.

    ``code`` is one of `schemas.codec.DECODE_CODES` (EMPTY, TRUNCATED, BAD_MARKER, UNKNOWN_SCHEMA, BAD_BODY,
    BAD_ENUM_INDEX, BAD_UNION_INDEX, BAD_VARINT, BAD_LENGTH, ...).
    """

    code = "UNDECODABLE"


class EncodeError(PermanentError):
    """A record that does not fit its schema (a bug in the producer of the record)."""

    code = "UNENCODABLE"


class ValidationError(PermanentError):
    """A request that breaks a rule; ``field`` names the field at fault (dotted for nested fields)."""

    def __init__(self, field: str, message: str, *, code: str | None = None) -> None:
        super().__init__(f"{field}: {message}", code=code or f"INVALID_{field.upper().replace('.', '_')}")
        self.field = field


class UnknownModelError(ValidationError):
    """A request naming a model the deployment's registry does not have (``UNKNOWN_MODEL``)."""

    def __init__(self, model: str) -> None:
        super().__init__("model", f"unknown model {model!r}", code="UNKNOWN_MODEL")


class DeliveryError(RetryableError):
    """Kafka did not acknowledge a produced message in time."""

    code = "DELIVERY_FAILED"
