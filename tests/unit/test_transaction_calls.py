"""The sink's rule for a failed transactional call (librdkafka's): retriable means call it again."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from confluent_kafka import KafkaError, KafkaException

from plumbing.watchdog import Watchdog
from stream_processors.assembler.sink import Sink, _within


@pytest.fixture
def sink():
    """What `Sink._call` needs of a sink: its watchdog (disarmed after the test, or it ends pytest)."""
    watchdog = Watchdog(600)
    yield SimpleNamespace(watchdog=watchdog)
    watchdog.stop()


def failing(*errors: KafkaError):
    """A call that raises ``errors`` in turn, then returns; it counts its calls."""
    calls = []

    def call() -> None:
        calls.append(1)
        if len(calls) <= len(errors):
            raise KafkaException(errors[len(calls) - 1])

    return call, calls


def test_a_retriable_error_calls_again_until_it_succeeds(sink):
    timed_out = KafkaError(KafkaError._TIMED_OUT, "retry call to resume", retriable=True)
    call, calls = failing(timed_out, timed_out)
    Sink._call(sink, call, threading.Event())
    assert len(calls) == 3


def test_an_error_that_is_not_retriable_is_raised_at_once(sink):
    call, calls = failing(KafkaError(KafkaError._STATE, "abort required", txn_requires_abort=True))
    with pytest.raises(KafkaException):
        Sink._call(sink, call, threading.Event())
    assert len(calls) == 1


def test_a_stopping_sink_does_not_call_again(sink):
    stop = threading.Event()
    stop.set()
    call, calls = failing(KafkaError(KafkaError._TIMED_OUT, retriable=True))
    with pytest.raises(KafkaException):
        Sink._call(sink, call, stop)
    assert len(calls) == 1


def test_within_raises_what_the_call_raised():
    error = KafkaException(KafkaError(KafkaError._TIMED_OUT, retriable=True))

    def call() -> None:
        raise error

    with pytest.raises(KafkaException) as raised:
        _within(5, call)
    assert raised.value is error


def test_within_gives_up_on_a_call_that_does_not_return():
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        _within(0.2, release.wait)
    assert time.monotonic() - started < 5
    release.set()


def test_within_gives_up_sooner_when_asked_to():
    """``give_up`` is asked while the call blocks; its first yes ends the wait, long before ``seconds``."""
    release = threading.Event()
    answers = iter([False, True])
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="given up"):
        _within(60, release.wait, lambda: next(answers))
    assert time.monotonic() - started < 5
    release.set()


def test_within_does_not_ask_to_give_up_once_the_call_returned():
    asked = []
    _within(60, lambda: None, lambda: asked.append(1) or True)
    assert asked == []
