"""make_consumer's session: CONSUMER_SESSION_MS, shortened to a shorter poll interval librdkafka requires."""

from __future__ import annotations

from plumbing.kafka_clients import CONSUMER_SESSION_MS, make_consumer
from plumbing.settings import Settings


def test_the_session_fits_a_shorter_poll_interval():
    # librdkafka refuses a consumer whose max.poll.interval.ms is below its session.timeout.ms (the
    # classic renderers' interval may be 10 s): the consumer is built, no broker needed
    consumer = make_consumer(Settings.load(), "g", "test", **{"max.poll.interval.ms": 10_000})
    consumer.close()
    assert CONSUMER_SESSION_MS > 10_000  # else this test would not test the shortening
