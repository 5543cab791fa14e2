"""`aigc tenants add` provisions a tenant and its quotas bind a running gatekeeper (real Kafka).

The gatekeeper runs as the real `aigc gatekeeper` process on a prefix of its own; one tenant is added
with a quota of one request (burst 1, a refill far too slow to matter), another with the defaults.
Each submits three requests at once: the first is refused twice (RATE_LIMITED), the second never.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from infra.bootstrap import ensure_topics
from plumbing.kafka_clients import make_admin, make_consumer
from plumbing.settings import GatekeeperSettings, ModelSpec, Settings
from plumbing.supervisor import StageSpec, Supervisor
from plumbing.topics import Topics
from producers.client import Client
from producers.tenants import add_tenant, list_tenants
from schemas.codec import default_codec
from tests.conftest import unique

READY_S = 120.0
OUTCOME_S = 60.0
IDLE_S = 3.0


def outcomes(settings: Settings, request_ids: set[str]) -> dict[str, str]:
    """request_id -> QUEUED (admitted) or the decision's reason code, read until all are known and idle."""
    topics = Topics(settings)
    consumer = make_consumer(settings, f"tenants-test-{uuid.uuid4().hex}", "test")
    names = [topics.status, *topics.all_decisions()]
    meta = consumer.list_topics(timeout=10).topics
    consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t in names for p in meta[t].partitions])
    codec, found = default_codec(), {}
    deadline, quiet_since = time.monotonic() + OUTCOME_S, time.monotonic()
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                if set(found) == request_ids and time.monotonic() - quiet_since >= IDLE_S:
                    break
                continue
            _, record = codec.decode_any(msg.value())
            rid = record["request_id"]
            if rid not in request_ids:
                continue
            if msg.topic() in topics.all_decisions():
                found[rid] = record["reason_code"]
            elif record["state"] == "QUEUED":
                found.setdefault(rid, "QUEUED")
            quiet_since = time.monotonic()
    finally:
        consumer.close()
    return found


def test_a_tenant_added_with_a_low_quota_is_rate_limited_and_another_is_not(infra: Settings, tmp_path: Path):
    tag = unique("ten")
    settings = infra.model_copy(
        update={
            "home": tmp_path,
            "kafka": infra.kafka.model_copy(update={"topic_prefix": tag}),
            "models": {"tiny-sd": ModelSpec(path=tmp_path / "none", backend="synthetic")},
            "gatekeeper": GatekeeperSettings(app_id=f"{tag}-gatekeeper"),
        }
    )
    ensure_topics(settings)
    slow, fast = f"slow-{tag}", f"fast-{tag}"
    changes, tier = add_tenant(settings, slow, requests_per_s=0.001, request_burst=1)
    assert tier.requests_per_s == 0.001 and tier.request_burst == 1
    assert f"topic {Topics(settings).reply_prefix(slow)}: created" in changes
    add_tenant(settings, fast)
    listed = {t.tenant_id: t for t in list_tenants(settings)}
    assert listed[slow].own_quotas and listed[slow].tier.request_burst == 1
    assert listed[fast].tier.request_burst == 40 and listed[fast].reply_topics == [f"{tag}.reply.{fast}"]
    assert Topics(settings).reply_prefix(fast) in make_admin(settings).list_topics(timeout=10).topics

    supervisor = Supervisor([StageSpec("gatekeeper", ["gatekeeper"], "gatekeeper")], settings.to_env(),
                            tmp_path / "logs", echo=print)  # fmt: skip
    supervisor.start()
    try:
        assert supervisor.wait_ready(READY_S), "gatekeeper not ready"
        ids: dict[str, list[str]] = {slow: [], fast: []}
        with Client(settings, known_models=None) as client:
            for tenant in (slow, fast):
                for i in range(3):
                    ids[tenant].append(
                        client.submit(
                            tenant_id=tenant,
                            prompt=f"a cat {i}",
                            model="tiny-sd",
                            width=64,
                            height=64,
                            steps=2,
                            guidance_scale=1.0,
                        )
                    )
        seen = outcomes(settings, set(ids[slow] + ids[fast]))
    finally:
        supervisor.stop()
    assert sorted(seen[r] for r in ids[slow]) == ["QUEUED", "RATE_LIMITED", "RATE_LIMITED"], seen
    assert [seen[r] for r in ids[fast]] == ["QUEUED"] * 3, seen


def test_cli_tenants_add_and_ls(infra: Settings):
    settings = infra.model_copy(
        update={"kafka": infra.kafka.model_copy(update={"topic_prefix": unique("tcli")})}
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIGC_")} | settings.to_env()

    def aigc(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "aigc", *args], env=env, capture_output=True,
                              text=True, timeout=120, check=False)  # fmt: skip

    added = aigc("tenants", "add", "acme", "--rate", "2", "--burst", "5")
    assert added.returncode == 0, added.stderr
    assert "tenant acme: 2 requests/s (burst 5)" in added.stdout
    bad = aigc("tenants", "add", "other", "--rate", "0")
    assert bad.returncode == 2 and "invalid quotas" in bad.stderr
    listed = aigc("tenants", "ls")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert rows["acme"][1:3] == ["2", "5"] and rows["acme"][5] == "own"
    assert "other" not in rows  # a refused add creates nothing
