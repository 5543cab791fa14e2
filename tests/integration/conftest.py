"""Per-test isolation on the shared services: a unique topic prefix, keyspace or bucket per test."""

from __future__ import annotations

import pytest

from infra.bootstrap import ensure_topics
from plumbing.settings import Settings
from plumbing.topics import Topics
from tests.conftest import unique


def with_prefix(settings: Settings, prefix: str) -> Settings:
    return settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"topic_prefix": prefix})})


@pytest.fixture
def isolated(infra: Settings) -> Settings:
    """Settings whose topics (all of the registry's, under a fresh prefix) exist and are empty."""
    settings = with_prefix(infra, unique())
    ensure_topics(settings, Topics(settings).all())
    return settings
