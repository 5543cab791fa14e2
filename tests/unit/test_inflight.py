"""Per-tenant in-flight caps: a tenant may not hold more than its cap of a class's queue."""

from __future__ import annotations

from stream_processors.gatekeeper.inflight import InflightCaps


def test_a_tenant_is_busy_at_its_cap_and_free_again_as_work_finishes():
    caps = InflightCaps({"LOW": 4})
    caps.admitted("a1", "A", "LOW", 3)
    assert not caps.would_exceed("A", "LOW", 1)
    assert caps.would_exceed("A", "LOW", 2)
    caps.admitted("a2", "A", "LOW", 1)
    assert caps.would_exceed("A", "LOW", 1)
    assert not caps.would_exceed("B", "LOW", 4)  # other tenants are not affected
    caps.finished("a1")
    assert caps.in_flight("A", "LOW") == 1 and not caps.would_exceed("A", "LOW", 3)


def test_uncapped_classes_and_oversized_requests_of_an_idle_tenant_pass():
    caps = InflightCaps({"LOW": 4})
    assert not caps.would_exceed("A", "HIGH", 1000)
    assert not caps.would_exceed("A", "LOW", 16)  # a 16-task video when nothing else is in flight
    caps.admitted("v", "A", "LOW", 16)
    assert caps.would_exceed("A", "LOW", 1)


def test_redelivered_and_unknown_requests_do_not_skew_the_counts():
    caps = InflightCaps({"NORMAL": 10})
    caps.admitted("r", "A", "NORMAL", 2)
    caps.admitted("r", "A", "NORMAL", 2)  # the same request decided again after a redelivery
    assert caps.in_flight("A", "NORMAL") == 2
    caps.finished("someone-else")
    caps.finished("r")
    caps.finished("r")
    assert caps.in_flight("A", "NORMAL") == 0
