"""The error taxonomy: every failure is sorted by what to do next.

- ``RETRYABLE``: a broker, storage or network blip, or a CUDA out-of-memory that a smaller batch may fix.
  The work goes to the stage's retry topic with a growing delay, then to its dead-letter topic.
- ``PERMANENT``: undecodable, invalid, unknown model, rejected. Retrying cannot help: dead-letter at once
  (or, for a request the gatekeeper can answer, a REJECTED completion).
- ``BACKPRESSURE``: a downstream is full, slow or unreachable (Cassandra or S3 down as a whole). Pause
  and try again later; never dead-letter.

`classify` is the one place that decides the class of an exception from any library; stages route on
its answer. An exception it does not know is a bug: it is classified as ``None`` and the stage crashes
loudly, so the message is redelivered after the fix instead of being dead-lettered by mistake.
"""

from __future__ import annotations

from schemas.errors import (
    BackPressure,
    DecodeError,
    DeliveryError,
    EncodeError,
    ErrorKind,
    PermanentError,
    PipelineError,
    RetryableError,
    UnknownModelError,
    ValidationError,
)

__all__ = [
    "BackPressure",
    "DecodeError",
    "DeliveryError",
    "EncodeError",
    "ErrorKind",
    "PermanentError",
    "PipelineError",
    "RetryableError",
    "UnknownModelError",
    "ValidationError",
    "classify",
    "is_fatal",
]


def classify(exc: BaseException) -> ErrorKind | None:
    """What to do about ``exc``; None means unknown, and unknown errors must crash the stage."""
    from confluent_kafka import KafkaException  # here: `aigc --help` imports this module, not Kafka

    if isinstance(exc, PipelineError):
        return exc.kind
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    if isinstance(exc, KafkaException):  # defined in the C module ``cimpl``: match the class, not the module
        return _kafka_kind(exc)
    if module.startswith("cassandra"):
        return _cassandra_kind(name)
    if module.startswith(("botocore", "boto3", "urllib3")):
        return _s3_kind(exc, name)
    return _other_kind(exc, name, module)


def is_fatal(error: object) -> bool:
    """Whether the Kafka error ``error`` means its client is done for. A fatal error that a poll or a
    delivery report hands back carries the code ``_FATAL`` but not the fatal flag (confluent-kafka builds
    a message's error from its code alone): in `aigc chaos` both sinks, their static membership fenced,
    went on polling dead consumers for minutes."""
    from confluent_kafka import KafkaError

    return isinstance(error, KafkaError) and (error.fatal() or error.code() == KafkaError._FATAL)


def _kafka_kind(exc: BaseException) -> ErrorKind | None:
    error = exc.args[0] if exc.args else None
    if is_fatal(error):
        return None  # a fenced or fatally failed client cannot go on: crash and restart the stage
    return ErrorKind.RETRYABLE


def _cassandra_kind(name: str) -> ErrorKind:
    if name in _CASSANDRA_DOWN:
        return ErrorKind.BACKPRESSURE  # the store is unreachable: wait for it, never dead-letter work
    if name in {"InvalidRequest", "SyntaxException", "Unauthorized", "AuthenticationFailed"}:
        return ErrorKind.PERMANENT
    return ErrorKind.RETRYABLE  # Unavailable, Read/WriteTimeout, OperationTimedOut: this operation failed


def _s3_kind(exc: BaseException, name: str) -> ErrorKind:
    if name in _S3_DOWN:
        return ErrorKind.BACKPRESSURE
    status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if status and 400 <= status < 500 and status not in (408, 429):
        return ErrorKind.PERMANENT
    return ErrorKind.RETRYABLE


def _other_kind(exc: BaseException, name: str, module: str) -> ErrorKind | None:
    if name == "OutOfMemoryError" and module.startswith("torch"):
        return ErrorKind.RETRYABLE
    if isinstance(exc, ConnectionRefusedError):
        return ErrorKind.BACKPRESSURE
    if isinstance(exc, ConnectionError | TimeoutError):
        return ErrorKind.RETRYABLE
    return None


# Errors that say a whole dependency is unreachable (as opposed to one operation failing).
_CASSANDRA_DOWN = frozenset({"NoHostAvailable", "ConnectionException", "ConnectionShutdown"})
_S3_DOWN = frozenset({"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"})
