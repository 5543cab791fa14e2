"""The poison corpus (tests/poison.py) builds against today's schemas without any infrastructure, so a
schema change that breaks one of its generators fails here, in seconds, not in the e2e run."""

from __future__ import annotations

from plumbing.settings import Settings
from tests.poison import GENERATORS, poison_corpus


def test_every_generator_builds_its_events_for_the_current_schemas() -> None:
    events = poison_corpus(Settings(), 1000, 20261123, now_ms=1_796_000_000_000)
    assert len(events) >= 1000
    assert {event.kind for event in events} == set(GENERATORS)
    assert all(event.expect in ("dead_letter", "rejected") for event in events)
