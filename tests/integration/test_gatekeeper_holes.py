"""The gatekeeper's hole check (faust_fixes repair 7) on a real broker: a transaction marker is a hole, a
record is not."""

from __future__ import annotations

from functools import partial

from plumbing.kafka_clients import make_consumer, make_producer, produce_sync
from plumbing.settings import Settings
from plumbing.topics import Topics
from stream_processors.gatekeeper.faust_fixes import HoleCheck
from tests.conftest import unique


def test_a_transaction_marker_is_a_hole_and_a_record_is_not(isolated: Settings):
    topic = Topics(isolated).requests("HIGH")
    txn = make_producer(isolated, "test", **{"transactional.id": unique("txn")})
    txn.init_transactions(30)
    txn.begin_transaction()
    for value in (b"a", b"b"):
        txn.produce(topic, value, b"k", partition=0)
    txn.commit_transaction(30)  # offsets 0 and 1, the commit marker at 2
    plain = make_producer(isolated, "test")
    produce_sync(plain, topic, b"c", key=b"k", partition=0)  # offset 3
    check = HoleCheck(partial(make_consumer, isolated, unique("holes"), "test"))
    assert check.records_at(topic, 0, [1, 2]) == {1}
    assert check.records_at(topic, 0, [0, 2, 3]) == {0, 3}
