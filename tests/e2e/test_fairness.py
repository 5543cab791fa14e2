"""Fairness between tenants of one class, end to end: a flood cannot stand in front of a newcomer.

Tenant A floods NORMAL with 15 requests at once; its in-flight cap is 3, so 3 are queued and the rest
are told TENANT_BUSY with a retry-after. Tenant B then submits 2 requests: they wait behind at most
A's 3 tasks, not behind A's whole burst.
"""

from __future__ import annotations

from pathlib import Path

from infra.pipeline import running_pipeline
from plumbing.settings import ModelSpec, Settings
from plumbing.topics import Topics
from producers.client import Client
from tests.e2e.conftest import collect, completions_of

SERVICE_MS = 400.0
CAP = 3


def test_a_flooding_tenant_holds_at_most_its_cap_of_the_queue(infra: Settings, tmp_path: Path):
    settings = infra.model_copy(
        update={
            "home": tmp_path,
            "models": {"synth": ModelSpec(path=Path("/synthetic"), backend="synthetic", max_batch=1)},
            "gatekeeper": infra.gatekeeper.model_copy(update={"tenant_inflight_cap": {"NORMAL": CAP}}),
        }
    )
    with running_pipeline(settings, synthetic_ms=SERVICE_MS, isolate="fair") as pipe:
        settings = pipe.settings
        fields = dict(
            prompt="a fair lantern", model="synth", width=64, height=64, steps=4, guidance_scale=7.5
        )
        with Client(settings) as client:
            flood = {client.submit(**fields, tenant_id="flooder") for _ in range(15)}
            # The gatekeeper has decided the whole burst before the newcomer arrives.
            decided = collect(
                settings,
                [Topics(settings).status, *Topics(settings).all_decisions()],
                lambda r: r["request_id"] in flood and r.get("state", "x") in ("ACCEPTED", "x"),
                lambda found: len(found) >= len(flood),
                timeout_s=60,
                idle_s=0,
            )
            assert len(decided) == len(flood)
            newcomer = {client.submit(**fields, tenant_id="newcomer") for _ in range(2)}
        outcomes = {c["request_id"]: c for c in completions_of(settings, flood | newcomer)}

    busy = [outcomes[r] for r in flood if outcomes[r]["reason_code"] == "TENANT_BUSY"]
    assert len(busy) == len(flood) - CAP  # the rest of the burst waits outside the queue
    assert all(c["retry_after_ms"] > 0 for c in busy)
    assert {outcomes[r]["status"] for r in newcomer} == {"SUCCEEDED"}
    # What rendered: the flooder's CAP queued requests and the newcomer's two, nothing else of the burst.
    rendered = collect(
        settings,
        Topics(settings).all_frames(),
        lambda r: r["request_id"] in flood | newcomer,
        lambda found: {r["request_id"] for r in found} >= newcomer,
    )
    assert len({r["request_id"] for r in rendered} & flood) == CAP
    # So a newcomer task waited behind at most CAP flooder tasks and the other newcomer task (one
    # renderer, one at a time): about 4 services and hand-offs (a fresh clone measured 2,011 ms; one run
    # on a loaded machine 2,271). Behind the whole burst it would be 15 services, over 6 s; half of that
    # is the bound, so load on the machine does not fail it.
    worst_wait_ms = max(t["started_at"] - t["enqueued_at"] for t in rendered if t["request_id"] in newcomer)
    print(f"worst newcomer wait {worst_wait_ms} ms")
    assert worst_wait_ms < len(flood) * SERVICE_MS / 2
