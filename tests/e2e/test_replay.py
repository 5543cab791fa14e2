"""Dead letters of a deliberately broken stage, replayed after the fix: once, and only once.

The renderer is broken by configuration: its model registry names the model differently from the
gatekeeper's, so every task it receives is dead-lettered (UNKNOWN_MODEL). After the fix (a renderer
with the right registry) a dry run changes nothing, the first replay completes every request exactly
once, and a second replay creates nothing new.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from infra.pipeline import running_pipeline
from plumbing.settings import ModelSpec, Settings
from plumbing.topics import Stage, Topics
from producers.checker import check_delivery
from producers.client import Client
from producers.dlq import Filters, read_dead_letters, replay
from tests.e2e.conftest import collect, completions_of

REQUESTS = 5
BROKEN = {"AIGC_MODELS": '{"synth-v2": {"path": "/synthetic", "backend": "synthetic"}}'}


def test_dead_letters_of_a_broken_stage_are_replayed_exactly_once(infra: Settings, tmp_path: Path):
    tag = uuid.uuid4().hex[:8]
    synthetic = ModelSpec(path=Path("/synthetic"), backend="synthetic")
    fields = dict(
        tenant_id="replayer",
        prompt="a replayed lantern",
        model="synth",
        width=64,
        height=64,
        steps=2,
        guidance_scale=7.5,
    )

    # 1. The broken renderer knows the model under another name: every task is dead-lettered.
    start = infra.model_copy(update={"home": tmp_path, "models": {"synth": synthetic}})
    with running_pipeline(start, synthetic_ms=5.0, isolate="replay", renderer_env=BROKEN) as broken:
        settings, topics = broken.settings, Topics(broken.settings)
        with Client(settings) as client:
            ids = {client.submit(**fields, request_id=f"rp-{tag}-{i}") for i in range(REQUESTS)}
        letters = collect(
            settings,
            [topics.dlq(Stage.RENDERER)],
            lambda r: r["request_id"] in ids,
            lambda found: len(found) >= REQUESTS,
        )
        assert {r["request_id"] for r in letters} == ids
        assert {r["error_code"] for r in letters} == {"UNKNOWN_MODEL"}

    # 2. Fixed: the renderer serves the model the gatekeeper routes, on the same topics. A dry run sends
    # nothing.
    with running_pipeline(settings, synthetic_ms=5.0):
        filters = Filters(stages=["renderer"])
        dry = replay(settings, filters, execute=False)
        assert sorted(a.action for a in dry.actions) == ["would send"] * REQUESTS
        assert collect(settings, [topics.completions], lambda r: r["request_id"] in ids, lambda _: True) == []
        assert len(read_dead_letters(settings, filters)) == REQUESTS  # nothing consumed or changed

        # 3. The first replay completes every request exactly once.
        first = replay(settings, filters, execute=True, rate=100.0)
        assert sorted(a.action for a in first.actions) == ["sent"] * REQUESTS
        done = completions_of(settings, ids)
        assert sorted(c["request_id"] for c in done) == sorted(ids)
        assert {c["status"] for c in done} == {"SUCCEEDED"}

        # 4. Replaying the same dead letters again creates nothing new.
        second = replay(settings, filters, execute=True, rate=100.0)
        assert [a.action for a in second.actions] == ["skip"] * REQUESTS
        assert len(completions_of(settings, ids, expected=REQUESTS)) == REQUESTS
        report = check_delivery(settings, ids)
        assert not report.lost and not report.duplicates and not report.orphan_rows, report.summary()
