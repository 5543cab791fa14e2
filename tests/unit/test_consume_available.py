"""consume_available hands back what is fetched, and ends the stage on a fatal consumer error."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException

from plumbing.kafka_clients import consume_available


class Fetched:
    def __init__(self, error: KafkaError | None = None) -> None:
        self._error = error

    def error(self) -> KafkaError | None:
        return self._error


class Fetching:
    """A consumer whose fetched messages are ``messages`` (the first comes from poll)."""

    def __init__(self, messages: list[Fetched]) -> None:
        self.messages = messages

    def poll(self, timeout: float) -> Fetched | None:
        return self.messages.pop(0) if self.messages else None

    def consume(self, n: int, timeout: float) -> list[Fetched]:
        taken, self.messages = self.messages[:n], self.messages[n:]
        return taken


def test_messages_and_ordinary_errors_are_handed_back():
    eof = Fetched(KafkaError(KafkaError._PARTITION_EOF))
    batch = consume_available(Fetching([Fetched(), eof, Fetched()]), 10, 0.1)  # type: ignore[arg-type]
    assert len(batch) == 3 and batch[1] is eof


def test_a_fatal_consumer_error_ends_the_stage():
    fenced = Fetched(KafkaError(KafkaError._FATAL, "static consumer fenced", fatal=True))
    with pytest.raises(KafkaException):
        consume_available(Fetching([Fetched(), fenced]), 10, 0.1)  # type: ignore[arg-type]


def test_a_fatal_error_handed_back_as_a_message_ends_the_stage():
    """As a poll delivers it: code _FATAL, and no fatal flag (what a sink fenced in `aigc chaos` got)."""
    fenced = Fetched(KafkaError(KafkaError._FATAL, "Fatal error: Broker: Static consumer fenced"))
    assert not fenced.error().fatal()  # type: ignore[union-attr]
    with pytest.raises(KafkaException):
        consume_available(Fetching([Fetched(), fenced]), 10, 0.1)  # type: ignore[arg-type]
