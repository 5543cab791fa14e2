"""The chaos run's plan and figures, without a pipeline: schedules are seeded and keep today's plan by
default, the new fault kinds are placed as asked, and the figures are computed from recorded windows."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import replace

import pytest

from aigc.cli import build_parser
from plumbing.settings import Settings
from producers.chaos import (
    FULL_PLAN,
    ChaosPlan,
    Fault,
    _Run,
    broker_service,
    busiest_leader,
    ephemeral_clashes,
    one_of_each,
    plan_from_args,
    schedule,
    stage_kind,
    zombie_candidates,
    zombie_pause_s,
)
from producers.chaos_figures import Finished, StageExit, Window, figures, longest_gap_ms, watchdog_exit

STAGES = ["gatekeeper", "renderer-default-0", "renderer-default-1", "assembler", "relay", "lag-exporter"]
PAUSES = dict.fromkeys(STAGES, 18.0)


def _old_schedule(plan: ChaosPlan, stages: list[str]) -> list[tuple[float, str]]:
    """The schedule before issue 14 (kills, then broker restarts), to replay old seeds."""
    rng = random.Random(plan.seed)
    window = (0.05 * plan.duration_s, 0.85 * plan.duration_s)
    faults = [(rng.uniform(*window), s) for s in stages for _ in range(plan.kills_per_stage)]
    faults += [(rng.uniform(*window), "broker") for _ in range(plan.broker_restarts)]
    return sorted(faults)


def _windows(faults):
    return [f for f in faults if f.kind != "kill"]


@pytest.mark.parametrize("seed", [1, 20261123, 999_999])
def test_the_default_plan_is_todays_schedule(seed):
    plan = ChaosPlan(seed=seed)
    faults = schedule(plan, STAGES, PAUSES)
    assert [(f.at_s, f.target) for f in faults] == _old_schedule(plan, STAGES)
    assert {f.kind for f in faults} == {"kill", "broker-restart"}


def test_the_full_plan_has_every_kind_and_the_same_seed_gives_the_same_schedule():
    plan = ChaosPlan(**{**FULL_PLAN, "seed": 42})
    faults = schedule(plan, STAGES, PAUSES)
    assert faults == schedule(plan, STAGES, PAUSES)
    assert faults != schedule(ChaosPlan(**{**FULL_PLAN, "seed": 43}), STAGES, PAUSES)
    kinds = [f.kind for f in faults]
    assert kinds.count("broker-kill") >= 6
    assert kinds.count("cassandra") == 2 and kinds.count("s3") == 2 and kinds.count("zombie") == 2
    assert plan.requests >= 500
    assert all(f.down_s == 20.0 for f in faults if f.kind in ("cassandra", "s3"))
    assert all(0 <= f.at_s <= plan.duration_s for f in faults)


@pytest.mark.parametrize("seed", range(20))
def test_faults_of_one_target_never_overlap_and_overlaps_are_placed(seed):
    plan = ChaosPlan(**{**FULL_PLAN, "seed": seed})
    windows = _windows(schedule(plan, STAGES, PAUSES))
    for a in windows:
        for b in windows:
            if a is not b and a.group == b.group:
                assert a.at_s + a.down_s <= b.at_s or b.at_s + b.down_s <= a.at_s, (a, b)
    pairs = sum(
        1
        for i, a in enumerate(windows)
        for b in windows[i + 1 :]
        if a.at_s < b.at_s + b.down_s and b.at_s < a.at_s + a.down_s
    )
    assert pairs >= plan.overlaps
    pairs_placed = {f.pair for f in windows if f.combined}
    assert len(pairs_placed) == plan.overlaps
    for pair in pairs_placed:  # a host, and a guest that starts inside the host's window
        host, guest = sorted((f for f in windows if f.pair == pair), key=lambda f: f.after_s)
        assert host.after_s == 0 and guest.at_s == pytest.approx(host.at_s + guest.after_s)
        assert 0 < guest.after_s < max(host.down_s, 1.0)


@pytest.mark.parametrize("seed", range(20))
def test_broker_kills_are_apart_from_every_other_planned_window_but_the_overlaps(seed):
    plan = ChaosPlan(**{**FULL_PLAN, "seed": seed, "overlaps": 0})
    windows = _windows(schedule(plan, STAGES, PAUSES))
    kills = [w for w in windows if w.kind == "broker-kill"]
    assert len(kills) == plan.broker_kills
    for kill in kills:
        for other in windows:
            if other is not kill:
                assert kill.at_s + kill.down_s <= other.at_s or other.at_s + other.down_s <= kill.at_s, (
                    kill,
                    other,
                )


REPLICATED = [
    "gatekeeper", "gatekeeper-1", "renderer-default-0", "renderer-default-1", "renderer-video-0",
    "assembler", "assembler-1", "relay", "relay-1", "lag-exporter",
]  # fmt: skip


def test_one_of_each_stage_is_killed_when_asked():
    assert [stage_kind(s) for s in REPLICATED] == [
        "gatekeeper", "gatekeeper", "renderer-default", "renderer-default", "renderer-video",
        "assembler", "assembler", "relay", "relay", "lag-exporter",
    ]  # fmt: skip
    chosen = one_of_each(REPLICATED, random.Random(1))
    assert sorted(stage_kind(s) for s in chosen) == sorted(set(map(stage_kind, REPLICATED)))
    plan = ChaosPlan(seed=9, kills_per_stage=1, broker_restarts=0, kill_one_of_each=True)
    killed = [f.target for f in schedule(plan, REPLICATED, PAUSES) if f.kind == "kill"]
    assert sorted(killed) == sorted(one_of_each(REPLICATED, random.Random(plan.seed + 4)))
    assert len(killed) == 6  # gatekeeper, two renderer pools, assembler, relay, lag exporter


def test_zombies_are_renderers_with_a_peer_or_the_assembler():
    assert zombie_candidates(STAGES) == {
        "renderer": ["renderer-default-0", "renderer-default-1"],
        "assembler": ["assembler"],
    }
    lone = ["gatekeeper", "renderer-default-0", "assembler", "relay"]
    assert zombie_candidates(lone) == {"assembler": ["assembler"]}
    faults = schedule(ChaosPlan(seed=5, zombies=2, renderers=2), STAGES, PAUSES)
    assert {f.target.split("-")[0] for f in faults if f.kind == "zombie"} == {"renderer", "assembler"}
    faults = schedule(ChaosPlan(seed=5, zombies=1, renderers=1), lone, PAUSES)
    assert [f.target for f in faults if f.kind == "zombie"] == ["assembler"]


def test_a_zombie_is_paused_past_the_timeout_that_hands_its_work_on():
    settings = Settings.load()
    share = settings.model_copy(
        update={"renderer": settings.renderer.model_copy(update={"share_lock_ms": 15_000})}
    )
    assert zombie_pause_s(share, "renderer-default-0", 3.0) == 18.0
    txn = settings.assembler.transaction_timeout_ms / 1000
    assert zombie_pause_s(settings, "assembler", 3.0) == max(30.0, txn) + 3.0
    assert zombie_pause_s(settings, "gatekeeper", 3.0) == 33.0
    plan = ChaosPlan(seed=1, zombies=1, zombie_s=25.0)
    assert [f.down_s for f in schedule(plan, STAGES, PAUSES) if f.kind == "zombie"] == [25.0]


def test_the_busiest_leader_leads_the_most_records():
    leaders = {("a", 0): 1, ("a", 1): 2, ("b", 0): 3, ("b", 1): -1}
    ends = {("a", 0): 10, ("a", 1): 50, ("b", 0): 45, ("b", 1): 1000}
    assert busiest_leader(leaders, ends) == 2
    assert busiest_leader({("a", 0): -1}, {("a", 0): 5}) is None
    assert broker_service(Settings.load(), 1) == "kafka"  # one broker: it is the leader


def test_the_cli_flags_make_the_plan():
    parse = build_parser().parse_args
    assert plan_from_args(parse(["chaos", "--seed", "3"])) == ChaosPlan(seed=3)
    full = plan_from_args(
        parse(["chaos", "--full", "--seed", "3", "--broker-kills", "8", "--zombie-s", "30"])
    )
    assert full == ChaosPlan(**{**FULL_PLAN, "seed": 3, "broker_kills": 8, "zombie_s": 30.0})
    mixed = plan_from_args(
        parse(["chaos", "--cassandra-outages", "1", "--cassandra-down", "5", "--seed", "1"])
    )
    assert (mixed.cassandra_outages, mixed.cassandra_down_s, mixed.broker_restarts) == (1, 5.0, 2)
    assert mixed.broker_kills_alone
    assert not plan_from_args(parse(["chaos", "--no-broker-kills-alone"])).broker_kills_alone


def test_with_kills_alone_off_a_broker_kill_neither_waits_nor_holds_others_off():
    run = _bare_run()
    run.plan = ChaosPlan(seed=1, broker_kills_alone=False)
    run.recovering["relay"] = (123, 0)
    assert run._take_turn(Fault(0.0, "broker", "broker-kill", 5.0)) is False  # at once, not alone
    assert run.alone_until == 0.0


def test_the_longest_gap_is_the_one_that_meets_the_window():
    times = [0, 1000, 2000, 9000, 10_000, 10_500]
    assert longest_gap_ms(times, 3000, 4000) == 7000  # from before the fault to after it
    assert longest_gap_ms(times, 9500, 9800) == 1000
    assert longest_gap_ms(times, 20_000, 30_000) is None


def test_figures_per_fault_window_next_to_the_steady_state():
    windows = [
        Window("broker-kill", "kafka", 10_000, 20_000),
        Window("s3", "s3proxy", 15_000, 30_000),
        Window("kill", "relay", 16_000, 18_000),
    ]
    finished = [
        # steady: one a second from 0 to 9 s, HIGH ones wait 100 ms
        *(Finished(f"s{i}", "HIGH", i * 1000 - 500, i * 1000, i * 1000 - 400) for i in range(10)),
        # during the faults: two completions, a HIGH one created during the broker kill waited 8 s
        Finished("f1", "HIGH", 12_000, 25_000, 20_000),
        Finished("f2", "LOW", 14_000, 28_000, 27_000),
        # after: steady again
        *(Finished(f"t{i}", "NORMAL", i * 1000 - 500, i * 1000, None) for i in range(31, 40)),
    ]
    exits = [
        StageExit("relay", -9, planned=True, watchdog=False),
        StageExit("assembler", 1, planned=False, watchdog=True),
        StageExit("renderer-default-0", 70, planned=False, watchdog=False),
    ]
    result = figures(windows, finished, (0, 40_000), exits)
    kill, s3, relay = result.faults
    assert relay.kind == "kill" and relay.seconds == 2.0
    assert (kill.label, kill.seconds, kill.completions) == ("broker-kill kafka", 10.0, 0)
    assert kill.high_waits_ms == (8000,)
    assert kill.longest_gap_s == 16.0  # 9 s -> 25 s
    assert kill.overlapping == ("s3 s3proxy", "kill relay")
    assert (s3.completions, s3.rate) == (2, 2 / 15)
    steady = result.steady
    assert steady.seconds == 20.0  # 0-10 s and 30-40 s
    assert steady.completions == 19 and steady.high_waits_ms == (100,) * 9  # s0 was created before the run
    assert steady.longest_gap_s == 1.0
    assert result.watchdog_restarts == 1
    assert [e.stage for e in result.unplanned_exits] == ["assembler", "renderer-default-0"]
    text = "\n".join(result.lines())
    assert "watchdog restarts: 1 (assembler 1x)" in text
    assert "other unplanned stage exits: 1 (renderer-default-0 code 70)" in text
    assert "8.00/8.00 s (1)" in text
    assert "with s3 s3proxy, 1 stage kill(s)" in text
    assert "stage kills: 1, successor ready after p50 2.0 s, max 2.0 s" in text
    assert "kill relay" not in text  # kills are summed up in one line


def test_only_broker_kills_no_other_window_met_count_as_alone():
    windows = [
        Window("broker-kill", "kafka-1", 10_000, 20_000),
        Window("kill", "relay", 16_000, 18_000),
        Window("broker-kill", "kafka-2", 50_000, 60_000),
    ]
    finished = [Finished(f"s{i}", "NORMAL", i * 1000 - 500, i * 1000, None) for i in range(70) if i % 7]
    result = figures(windows, finished, (0, 70_000))
    assert result.lone_broker_kill_gaps == [2.0]  # kafka-2: 48 -> 50, 55 -> 57 ...
    assert "broker kills alone: 1, longest gap in each: 2.0 s" in "\n".join(result.lines())


def _bare_run() -> _Run:
    """A run's fault bookkeeping without a pipeline (only what `_take_turn` reads)."""
    run = object.__new__(_Run)
    run.mutex, run.recovering, run.paused, run.outages, run.alone_until = threading.Lock(), {}, {}, set(), 0.0
    run.hosts, run.guests_due, run.plan = {}, {}, ChaosPlan(seed=1)
    return run


def test_a_lone_broker_kill_waits_for_quiet_then_holds_other_faults_off(monkeypatch):
    monkeypatch.setattr("producers.chaos.QUIET_WAIT_S", 5.0)
    run = _bare_run()
    run.recovering["relay"] = (123, 0)  # a stage kill is not over yet
    kill = Fault(0.0, "broker", "broker-kill", 5.0)
    took: list[bool] = []
    waiter = threading.Thread(target=lambda: took.append(run._take_turn(kill)))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and run.alone_until == 0.0  # waits while the relay's successor is not ready
    del run.recovering["relay"]
    waiter.join(2.0)
    assert took == [True] and run.alone_until == float("inf") and run.outages == {"broker"}
    outage = Fault(0.0, "cassandra", "cassandra", 20.0)
    other = threading.Thread(target=run._take_turn, args=(outage,))
    other.start()
    other.join(0.5)
    assert other.is_alive() and "cassandra" not in run.outages  # held off by the lone kill
    assert run._take_turn(replace(outage, target="s3proxy", kind="s3", pair=1)) is False  # a host
    with run.mutex:  # the kill's window is over, and the time after it
        run.alone_until = time.monotonic()
    other.join(2.0)
    assert not other.is_alive() and "cassandra" in run.outages


def test_a_guest_starts_its_delay_after_its_host_actually_started():
    run = _bare_run()
    host = Fault(0.0, "broker", "broker-kill", 5.0, pair=1)
    guest = Fault(0.0, "cassandra", "cassandra", 20.0, pair=1, after_s=0.5)
    took = threading.Thread(target=run._take_turn, args=(guest,))
    took.start()
    took.join(0.5)
    assert took.is_alive()  # the host has not started (its broker lock, or SETTLE_S, held it up)
    assert run._take_turn(host) is False  # combined: not a lone kill
    started = time.monotonic()
    took.join(2.0)
    assert not took.is_alive() and time.monotonic() - started >= 0.4
    assert run.outages == {"broker", "cassandra"}


def test_a_lone_broker_kill_waits_no_longer_than_its_limit(monkeypatch):
    monkeypatch.setattr("producers.chaos.QUIET_WAIT_S", 0.3)
    run = _bare_run()
    run.paused["assembler"] = (1, 0.0, 0)  # a zombie that outlasts the limit
    started = time.monotonic()
    assert run._take_turn(Fault(0.0, "broker", "broker-kill", 5.0)) is True
    assert 0.3 <= time.monotonic() - started < 2.0 and run.alone_until == float("inf")


def test_a_watchdog_exit_is_told_from_its_log():
    assert watchdog_exit("...\nTimeout (0:01:30)!\nThread 0x00007f (most recent call first):\n")
    assert watchdog_exit("CRITICAL no progress for 120 s on aigc.requests.high:0; exiting")
    assert not watchdog_exit("Current thread 0x00007f (most recent call first):\n")


def test_service_ports_in_the_ephemeral_range_are_warned_about(tmp_path):
    ports = tmp_path / "ip_local_port_range"
    ports.write_text("32768\t60999\n")
    settings = Settings.load()  # dev ports 19xxx: below the range
    assert ephemeral_clashes(settings, ports) == []
    high = settings.model_copy(update={"cassandra": settings.cassandra.model_copy(update={"port": 36042})})
    (warning,) = ephemeral_clashes(high, ports)
    assert "cassandra port 36042" in warning
    assert ephemeral_clashes(settings, tmp_path / "missing") == []
