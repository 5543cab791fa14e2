"""What `infra.pipeline` decides before it starts anything: the names of an isolated run, and that only
an isolated run may be dropped."""

from __future__ import annotations

import pytest

from infra.pipeline import isolated, running_pipeline
from plumbing.settings import Settings


def test_an_isolated_run_has_its_own_topics_keyspace_and_gatekeeper_group():
    shared = Settings()
    one, two = isolated(shared, "bench"), isolated(shared, "bench")
    for run in (one, two):
        tag = run.kafka.topic_prefix.removeprefix("bench")
        assert run.cassandra.keyspace == f"bench_{tag}"
        assert run.gatekeeper.app_id == f"bench-{tag}-gatekeeper"
    assert one.kafka.topic_prefix != two.kafka.topic_prefix
    assert shared.kafka.topic_prefix == "aigc"  # the shared settings are left alone


@pytest.mark.parametrize("name", ["Bench", "b-1", "1b", "", "x" * 26])
def test_an_isolated_run_name_is_a_short_lowercase_word(name: str):
    with pytest.raises(ValueError, match="isolate"):
        isolated(Settings(), name)


def test_drop_without_isolate_is_refused_before_anything_starts():
    with pytest.raises(ValueError, match="needs isolate"), running_pipeline(Settings(), drop=True):
        pass
