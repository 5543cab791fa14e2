"""The supervisor asks each stage's /readyz and keeps Prometheus's file-SD file current.

The stage here is a real `aigc lag-exporter` pointed at a closed port: it serves its endpoints at once
and stays not ready (Kafka unmet), which is all these tests need; no infrastructure runs.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

from plumbing.settings import Settings, WebhookSettings
from plumbing.supervisor import (
    StageSpec,
    Supervisor,
    free_port,
    free_ports,
    pipeline_stages,
    probe_ready,
)


def until(condition, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_readiness_and_discovery_follow_the_processes(tmp_path: Path) -> None:
    targets = tmp_path / "prometheus" / "targets" / "unit.json"
    env = {"AIGC_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1", "AIGC_OBSERVABILITY__LAG_INTERVAL_S": "60"}
    supervisor = Supervisor([StageSpec("lag-exporter", ["lag-exporter"], "lag_exporter")], env,
                            tmp_path / "logs", echo=lambda _: None, max_backoff_s=0.5, targets=targets,
                            pipeline="unit")  # fmt: skip
    supervisor.start()
    try:
        child = supervisor.children["lag-exporter"]
        assert json.loads(targets.read_text()) == [
            {
                "targets": [f"127.0.0.1:{child.port}"],
                "labels": {"stage": "lag_exporter", "instance_name": "lag-exporter", "pipeline": "unit"},
            }
        ]

        def answered() -> bool:
            supervisor.poll()
            return child.unmet != ["not answering"] and child.checked_at > 0

        until(answered)
        state = supervisor.snapshot()["lag-exporter"]
        assert (state["alive"], state["ready"], state["unmet"]) == (True, False, ["kafka"])
        assert not supervisor.wait_ready(0.5)

        # A stage that dies leaves the targets; restarted, it is back on the same port.
        port = child.port
        supervisor.signal("lag-exporter", signal.SIGKILL)
        child.proc.wait(10)
        supervisor.poll()
        assert json.loads(targets.read_text()) == []
        until(lambda: (supervisor.poll(), supervisor.children["lag-exporter"] is not child)[1])
        assert supervisor.children["lag-exporter"].port == port
        assert json.loads(targets.read_text())[0]["targets"] == [f"127.0.0.1:{port}"]
    finally:
        supervisor.stop(grace_s=10)
    assert not targets.exists()


def test_probe_of_a_closed_port_is_not_ready() -> None:
    assert probe_ready(free_port()) == (False, ["not answering"])


def test_the_webhook_stage_follows_its_setting_unless_the_caller_decides():
    def names(settings: Settings, **kwargs: bool) -> list[str]:
        return [s.name for s in pipeline_stages(settings, renderers=1, **kwargs)]

    on, off = Settings(), Settings(webhooks=WebhookSettings(enabled=False))
    assert "webhooks" in names(on) and "webhooks" not in names(off)
    assert "webhooks" not in names(on, webhooks=False) and "webhooks" in names(off, webhooks=True)
    (spec,) = [s for s in pipeline_stages(on, renderers=1) if s.name == "webhooks"]
    assert spec.verb == ["webhooks", "deliver"] and spec.stage == "webhooks"


def test_replicas_are_separate_members_with_identities_of_their_own():
    stages = pipeline_stages(Settings(), renderers=2, replicas=2, webhooks=True)
    names = [s.name for s in stages]
    for stage in ("gatekeeper", "assembler", "relay", "webhooks"):
        assert names.count(stage) == 1 and names.count(f"{stage}-1") == 1, names
    assert names.count("lag-exporter") == 1  # one reader of the lags is enough
    assert len(set(names)) == len(names)
    # static group membership: each process its own group.instance.id
    assert len({s.env["AIGC_INSTANCE"] for s in stages}) == len(stages)
    sinks = [s for s in stages if s.stage == "assembler"]
    # a transactional.id each: the two sinks must not fence each other
    assert [s.env.get("AIGC_ASSEMBLER__INSTANCE", "0") for s in sinks] == ["0", "1"]
    assert [s.name for s in pipeline_stages(Settings(), renderers=1)] == [
        s.name for s in pipeline_stages(Settings(), renderers=1, replicas=1)
    ]


def test_free_ports_lie_below_the_ephemeral_range() -> None:
    first = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= p < first for p in ports) and len(ports) > 1
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        taken = held.getsockname()[1]
        assert free_port(taken) != taken


def test_free_ports_are_distinct() -> None:
    ports = free_ports(30)
    assert len(set(ports)) == 30
