"""The gatekeeper's faust app as built by `create_app` (no broker needed to build it)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from faust.exceptions import PartitionsMismatch

from plumbing.clock import now_ms
from plumbing.settings import Settings
from plumbing.topics import Topics
from schemas.codec import default_codec
from schemas.records import GenerationRequest
from stream_processors.gatekeeper import app as app_module
from stream_processors.gatekeeper import faust_fixes
from stream_processors.gatekeeper.app import Handler, SeenExpiry, create_app, make_gate
from stream_processors.gatekeeper.tables import Bucket, Seen, TypedTable


def test_changelog_topics_are_not_acked_like_faust_s_own(tmp_path: Path) -> None:
    """An acked changelog makes faust's livelock detector log "Stream has not started processing
    TP(...changelog...)" every few seconds once the worker has written its tables (issue 11, item 3)."""
    settings = Settings.load(home=tmp_path)
    app = create_app(settings, make_gate(settings, None))
    tables = dict(app.tables.items())
    assert set(tables) == {"seen", "buckets"}
    for table in tables.values():
        assert table.changelog_topic.acks is False, table.name
    request_topics = [agent.channel for agent in app.agents.values()]
    assert request_topics and all(topic.acks for topic in request_topics)


class _MismatchedTable(dict):
    """A table whose writes fail as faust's did in the chaos test: the consumer's metadata did not hold
    the just-created changelog topic yet."""

    def __setitem__(self, key: str, value: object) -> None:
        raise PartitionsMismatch("the changelog topic has 0 partitions")


def test_an_error_while_handling_ends_the_worker_before_the_request_counts_as_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """faust restarts a crashed agent and counts its event as done; the commit then skips the request."""
    settings = Settings.load(home=tmp_path)
    gate = make_gate(settings, None)
    app = create_app(settings, gate)
    seen = TypedTable(_MismatchedTable(), Seen)
    deliveries = faust_fixes.Deliveries()
    handler = Handler(
        app, gate, seen, TypedTable({}, Bucket), SeenExpiry(seen, 60_000), None, None, deliveries
    )
    request = GenerationRequest(
        request_id="req-1",
        tenant_id="tenant-a",
        kind="IMAGE",
        prompt="a lighthouse at dusk",
        model=next(iter(settings.models)),
        width=64,
        height=64,
        steps=4,
        guidance_scale=7.5,
        created_at=now_ms(),
    )
    topic = Topics(settings).requests("HIGH")
    message = SimpleNamespace(
        topic=topic,
        partition=0,
        offset=7,
        timestamp=time.time(),
        key=b"tenant-a",
        value=default_codec().write(request),
        headers=[],
    )

    def fake_exit(status: int) -> None:
        raise SystemExit(status)

    monkeypatch.setattr(app_module.os, "_exit", fake_exit)
    with pytest.raises(SystemExit) as exited:
        asyncio.run(handler.handle(message))
    assert exited.value.code == 70
    assert deliveries.handled == {} and deliveries.pending == []  # nothing sent, nothing counts as done
