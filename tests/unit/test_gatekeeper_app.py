"""The gatekeeper's faust app as built by `create_app` (no broker needed to build it)."""

from __future__ import annotations

from pathlib import Path

from plumbing.settings import Settings
from stream_processors.gatekeeper.app import create_app, make_gate


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
