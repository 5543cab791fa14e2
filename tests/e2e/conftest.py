"""The whole pipeline, once per test session: real stage processes on an isolated topic prefix and keyspace.

The stages run as `aigc` child processes under the supervisor, as `aigc run` runs them, with the tiny
model built once for the session. Tests use their own request ids and tenants, so they share it.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.pipeline import running_pipeline
from plumbing.kafka_clients import make_consumer
from plumbing.settings import GatekeeperSettings, ModelSpec, Settings, Tier
from plumbing.topics import Topics
from schemas.codec import default_codec

RESULT_TIMEOUT_S = 120.0
IDLE_S = 2.0  # read on this long after the last match: a duplicate would come with it, or just after


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-sd"
    subprocess.run([sys.executable, "-m", "aigc", "models", "build-tiny", str(path)], check=True,
                   capture_output=True)  # fmt: skip
    return path


@contextlib.contextmanager
def e2e_pipeline(infra: Settings, tiny_model: Path, home: Path, consumer: str) -> Iterator[Settings]:
    """The stages on a fresh topic prefix and keyspace, renderers in ``consumer`` mode (share, classic)."""
    settings = infra.model_copy(
        update={
            "home": home,
            "models": {"tiny-sd": ModelSpec(path=tiny_model)},
            "gatekeeper": GatekeeperSettings(
                tiers={"standard": Tier(), "limited": Tier(requests_per_s=0.001, request_burst=1)},
                tenant_tiers={"limited-tenant": "limited"},
                dedupe_window_s=600,
            ),
            "renderer": infra.renderer.model_copy(update={"consumer": consumer}),
        }
    )
    with running_pipeline(
        settings, isolate="e2e", drop=True, echo=lambda line: print(f"[pipeline] {line}")
    ) as pipe:
        yield pipe.settings


@pytest.fixture(scope="session")
def share_pipeline(
    infra: Settings, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    """The pipeline with share-group renderers (the default), shared by the session's tests."""
    with e2e_pipeline(infra, tiny_model, tmp_path_factory.mktemp("home"), "share") as settings:
        yield settings


@pytest.fixture(scope="session")
def pipeline(share_pipeline: Settings) -> Settings:
    """The pipeline of the default renderer mode (share groups)."""
    return share_pipeline


@pytest.fixture(scope="session")
def classic_pipeline(
    infra: Settings, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    """The pipeline with classic consumer-group renderers (``renderer.consumer=classic``)."""
    with e2e_pipeline(infra, tiny_model, tmp_path_factory.mktemp("home"), "classic") as settings:
        yield settings


def collect(
    settings: Settings,
    topics: Iterable[str],
    match: Callable[[dict[str, Any]], bool],
    until: Callable[[list[dict[str, Any]]], bool],
    timeout_s: float = RESULT_TIMEOUT_S,
    idle_s: float = IDLE_S,
) -> list[dict[str, Any]]:
    """Records on ``topics`` (from the beginning) that ``match``, read until ``until`` holds and then
    ``idle_s`` passes with nothing new (so a stray extra record would be seen), or the timeout."""
    consumer = make_consumer(settings, f"e2e-{uuid.uuid4().hex}", "e2e")
    consumer.subscribe(list(topics))
    codec = default_codec()
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    satisfied_at: float | None = None
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                _, record = codec.decode_any(msg.value())
                if match(record):
                    found.append({**record, "_topic": msg.topic()})
                    satisfied_at = None
            if until(found):
                satisfied_at = satisfied_at or time.monotonic()
                if time.monotonic() - satisfied_at >= idle_s:
                    break
    finally:
        consumer.close()
    return found


def completions_of(
    settings: Settings, request_ids: set[str], expected: int | None = None
) -> list[dict[str, Any]]:
    expected = len(request_ids) if expected is None else expected
    return collect(settings, [Topics(settings).completions], lambda r: r["request_id"] in request_ids,
                   lambda found: len(found) >= expected)  # fmt: skip
