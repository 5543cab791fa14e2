"""A stage that starts while Cassandra is down waits for it (`connect_when_up`) instead of exiting."""

from __future__ import annotations

import logging
import threading

import pytest

from plumbing.backoff import Backoff
from plumbing.metadata import connect_when_up
from plumbing.settings import CassandraSettings
from plumbing.supervisor import free_port


def test_a_start_during_an_outage_keeps_trying_until_stopped(caplog: pytest.LogCaptureFixture):
    closed = CassandraSettings(hosts=["127.0.0.1"], port=free_port())  # nothing listens there
    stop = threading.Event()
    timer = threading.Timer(1.5, stop.set)
    timer.start()
    with caplog.at_level(logging.WARNING, logger="plumbing.metadata"):
        assert connect_when_up(closed, stop, Backoff(first_s=0.1, max_s=0.2)) is None
    timer.cancel()
    tries = [r for r in caplog.records if "Cassandra is not reachable" in r.getMessage()]
    assert len(tries) >= 2, caplog.text
    assert stop.is_set()
