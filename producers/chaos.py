"""`aigc chaos`: kill every stage and inject infrastructure faults while requests flow, then account for
every request.

The pipeline's real stage processes run under the supervisor on their own topic prefix and keyspace
(the synthetic backend renders, so hundreds of requests fit in minutes). A workload of images and
videos at every priority is submitted over the run; on a schedule drawn from one seed (printed, so a
run can be replayed with ``--seed``) faults are injected:

- **stage kills**: every stage process is killed with SIGKILL several times and restarted by the
  supervisor;
- **broker restarts**: the broker is stopped (SIGTERM) and started again (today's plan);
- **broker kills**: the broker that leads the busiest partitions of the run's topics (the most records,
  from the admin client's metadata and end offsets) is killed with SIGKILL and started again after a
  downtime; with one broker that is the broker, an outage;
- **Cassandra and S3 outages**: the service is stopped for a while, then started again;
- **zombies**: a stage process is paused with SIGSTOP for longer than the timeout after which its work
  goes to others (see `zombie_pause_s`) and resumed with SIGCONT: a renderer's share-group locks have
  expired by then, the assembler's transaction has been aborted and its producer fenced;
- **overlaps**: some of those windows are placed inside another fault's window, so faults combine.
  Every other broker kill is measured alone (unless the plan's ``broker_kills_alone`` is off): it waits
  (up to `QUIET_WAIT_S`) until no other fault is in progress, and the stage kills, zombies and outages
  that fall due during its window wait until it is over (and `ALONE_AFTER_S` more: a gap that meets a
  window counts in full, so the next fault must not start one).

Service faults run in threads of their own (so they overlap); the services are started again from a
long-lived thread, because a service started attached dies with the thread that started it
(PR_SET_PDEATHSIG). When the workload and the faults are over, the run waits for the pipeline to
drain and the delivery checker reports lost requests, duplicate completions and orphans; the figures
(`producers.chaos_figures`) give each fault window's throughput, HIGH queue wait and longest gap between
completions next to the steady state, and the stage exits nobody planned (watchdog restarts). Exit
status 0 only when nothing was lost, duplicated or orphaned.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import os
import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError
from cassandra.cluster import NoHostAvailable, OperationTimedOut
from confluent_kafka import KafkaException, TopicPartition
from confluent_kafka.admin import OffsetSpec

from infra.launcher import InfraError, down, kill, status, up
from infra.pipeline import RunningPipeline, running_pipeline
from infra.services import all_services
from plumbing.clock import now_ms
from plumbing.errors import DecodeError, DeliveryError
from plumbing.kafka_clients import CONSUMER_SESSION_MS, make_admin
from plumbing.settings import Settings, Tier
from plumbing.supervisor import EPHEMERAL_PORTS, Supervisor, ephemeral_range
from plumbing.topics import Topics
from producers.chaos_figures import Figures, Finished, StageExit, Window, figures, watchdog_exit
from producers.checker import BoundedRead, DeliveryReport, check_delivery
from producers.client import Client
from schemas.codec import default_codec
from schemas.records import Completion, FramesRendered, GenerationRequest, VideoSpec

DRAIN_TIMEOUT_S = 300.0
CHECK_EVERY_S = 5.0
STALL_S = 60.0  # no request finished for this long: ask every stage for its stacks
STALL_RESTART_S = 90.0
# A run's tenants are its own (results live under their S3 prefixes) and unthrottled: after a broker
# outage the submitter sends what fell due meanwhile in a burst, which rate limits would rightly refuse.
UNTHROTTLED = Tier(requests_per_s=1e6, request_burst=1e6, cost_per_s=1e18, cost_burst=1e18)
# Planning: how long a service takes to answer again after it is started (a guess, to space the faults
# of one service; at run time a service's next fault waits for its last one to be over anyway).
# How long a service takes to answer again after its start, for planning (measured here under load: a
# cluster node 14-42 s, the single broker about a minute; Cassandra 20-45 s; S3Proxy 3-15 s).
RECOVERY_GUESS_S = {"broker": 25.0, "cassandra": 60.0, "s3proxy": 20.0}
# At run time, a service's next fault waits this long after its last one was over: a broker killed again
# the moment it answers would make several planned kills one long outage.
SETTLE_S = 20.0
CONSUMER_SESSION_S = CONSUMER_SESSION_MS / 1000  # the sink's and the gatekeeper's consumers
SERVICE_KINDS = ("broker-restart", "broker-kill", "cassandra", "s3")
QUIET_WAIT_S = 60.0  # the longest a lone broker kill waits for the other faults in progress to be over
PAIR_WAIT_S = 120.0  # the longest a combined fault's guest waits for its host to start
ALONE_AFTER_S = 10.0  # how long after a lone broker kill's window the faults it held off still wait
START_TRIES = 3  # a service that fails to start again is started again, up to this often
# What a delivery check may meet while a store is still coming back: it is asked again.
CHECK_ERRORS = (KafkaException, NoHostAvailable, OperationTimedOut, BotoCoreError)
_STARTER = ThreadPoolExecutor(4, thread_name_prefix="chaos-infra")  # lives as long as the process


@dataclass(frozen=True)
class ChaosPlan:
    """What a chaos run does: its workload, its faults and the seed both are drawn from.

    The defaults are today's plan (stage kills and broker restarts); `FULL_PLAN` adds every fault kind
    (`make chaos`)."""

    requests: int = 200
    duration_s: float = 90.0  # submissions and faults happen within this window
    kills_per_stage: int = 3
    broker_restarts: int = 2
    renderers: int = 2
    replicas: int = 1  # gatekeepers, assemblers and relays (two: a kill leaves one working)
    kill_one_of_each: bool = False  # kill one process of each stage (drawn), not every process
    synthetic_ms: float = 20.0
    seed: int = field(default_factory=lambda: random.SystemRandom().randrange(1_000_000))
    broker_down_s: float = 3.0  # how long each broker restart keeps it stopped (its start-up comes on top)
    broker_kills: int = 0  # SIGKILLs of the busiest partitions' leader
    broker_kill_down_s: float = 5.0
    cassandra_outages: int = 0
    cassandra_down_s: float = 20.0
    s3_outages: int = 0
    s3_down_s: float = 20.0
    zombies: int = 0  # stage processes paused (SIGSTOP) past their timeout, then resumed
    zombie_s: float | None = None  # how long a zombie is paused; None: its timeout + zombie_margin_s
    zombie_margin_s: float = 3.0
    overlaps: int = 0  # faults placed inside another fault's window
    # Each broker kill not combined on purpose waits for quiet and holds other faults off (see `_take_turn`),
    # so its figures are its own; off, faults fall as scheduled (shorter runs, figures mixed).
    broker_kills_alone: bool = True
    share_lock_ms: int = 15_000  # with zombies: the renderers' lock, so a paused renderer loses it soon
    # Keep the run's topics and keyspace for `aigc trace` afterwards; otherwise they are deleted once the
    # run is checked, so that repeated runs do not grow the cluster (~190 partitions a run, every one of
    # them a leader to move when a broker dies).
    keep: bool = False


# The plan's fields `aigc chaos` has a flag for (the flag's dest is the field's name).
CHAOS_FLAGS = (
    "requests",
    "duration_s",
    "kills_per_stage",
    "broker_restarts",
    "broker_down_s",
    "broker_kills",
    "broker_kill_down_s",
    "cassandra_outages",
    "cassandra_down_s",
    "s3_outages",
    "s3_down_s",
    "zombies",
    "zombie_s",
    "overlaps",
    "broker_kills_alone",
    "renderers",
    "replicas",
    "kill_one_of_each",
    "synthetic_ms",
    "seed",
    "keep",
)
# `make chaos`: issue 14's targets (>= 6 broker kills, 2 Cassandra and 2 S3 outages of 20 s, 2 zombies,
# >= 500 requests), with two of the faults placed inside another's window.
FULL_PLAN: dict[str, object] = {
    "requests": 500,
    # Room for each broker kill to be measured alone (a node is back after 14-42 s here, and the next kill
    # of that node waits SETTLE_S more), beside the outages and zombies.
    "duration_s": 600.0,
    "kills_per_stage": 3,
    "broker_restarts": 0,
    "renderers": 2,
    "replicas": 2,
    "broker_kills": 6,
    "broker_kill_down_s": 5.0,
    "cassandra_outages": 2,
    "cassandra_down_s": 20.0,
    "s3_outages": 2,
    "s3_down_s": 20.0,
    "zombies": 2,
    "overlaps": 2,
}


def plan_from_args(args: argparse.Namespace) -> ChaosPlan:
    """The plan `aigc chaos` was asked for: today's defaults, or `FULL_PLAN` with ``--full``, with the
    flags given on top (an attribute per `CHAOS_FLAGS` name, None when not given, and ``full``)."""
    given = {name: getattr(args, name) for name in CHAOS_FLAGS if getattr(args, name, None) is not None}
    fields: dict[str, Any] = {**(FULL_PLAN if args.full else {}), **given}
    return ChaosPlan(**fields)


def tenants(plan: ChaosPlan) -> tuple[str, ...]:
    """The run's own tenants (their results live under their own S3 prefixes)."""
    return tuple(f"chaos-{plan.seed}-{name}" for name in "abc")


@dataclass(frozen=True)
class Fault:
    """One fault of the schedule: when, in seconds from the start, what it does to what, for how long.

    Kinds: ``kill`` (SIGKILL a stage process), ``broker-restart`` (stop and start the broker),
    ``broker-kill`` (SIGKILL the busiest partitions' leader, start it again), ``cassandra`` and ``s3``
    (stop the service, start it again), ``zombie`` (SIGSTOP a stage process, SIGCONT it)."""

    at_s: float
    target: str  # a stage process, or the service: "broker", "cassandra", "s3proxy"
    kind: str = "kill"
    down_s: float = 0.0
    # Two faults placed together on purpose (`_overlap`) share a pair number; at run time the guest starts
    # ``after_s`` after its host actually started. Faults of no pair (0) run alone where it matters.
    pair: int = 0
    after_s: float = 0.0

    @property
    def combined(self) -> bool:
        """Whether the fault was placed with another on purpose."""
        return self.pair != 0

    @property
    def group(self) -> str:
        """What two faults must not hit at once: the broker(s), a service, or a stage."""
        return self.target


def zombie_pause_s(settings: Settings, stage: str, margin_s: float) -> float:
    """How long to pause ``stage`` so that it is a zombie when it resumes: past the renderers' share lock
    (``renderer.share_lock_ms``; classic: ``renderer.max_poll_interval_ms``), past the consumer session
    and ``assembler.transaction_timeout_ms`` for the sink, past the consumer session for the others."""
    if stage.startswith("renderer-"):
        if settings.renderer.consumer == "share":
            timeout_s = settings.renderer.share_lock_ms / 1000
        else:
            timeout_s = settings.renderer.max_poll_interval_ms / 1000
    elif stage_kind(stage) == "assembler":
        timeout_s = max(CONSUMER_SESSION_S, settings.assembler.transaction_timeout_ms / 1000)
    else:
        timeout_s = CONSUMER_SESSION_S
    return timeout_s + margin_s


def zombie_candidates(stages: Sequence[str]) -> dict[str, list[str]]:
    """Stages a zombie may be, by kind: renderers whose pool has another renderer to take their work,
    and the assembler (whose resumed producer must be fenced)."""
    pools = Counter(stage_kind(s) for s in stages if s.startswith("renderer-"))
    found = {
        "renderer": [s for s in stages if s.startswith("renderer-") and pools[stage_kind(s)] > 1],
        "assembler": [s for s in stages if stage_kind(s) == "assembler"],
    }
    return {kind: names for kind, names in found.items() if names}


def _place(rng: random.Random, busy: list[tuple[float, float]], lo: float, hi: float, length: float) -> float:
    """A start in [lo, hi] for a window of ``length`` that meets none of ``busy``; after the last one
    when 50 draws found no room."""
    for _ in range(50):
        at = rng.uniform(lo, max(lo, hi))
        if all(at + length <= a or at >= b for a, b in busy):
            return at
    return max((b for _, b in busy), default=lo)


def _windows(plan: ChaosPlan, stages: Sequence[str], pauses: Mapping[str, float]) -> list[Fault]:
    """The new fault kinds' faults, unplaced (at_s 0): broker kills, outages, zombies."""
    rng = random.Random(plan.seed + 3)
    faults = [Fault(0.0, "broker", "broker-kill", plan.broker_kill_down_s)] * plan.broker_kills
    faults += [Fault(0.0, "cassandra", "cassandra", plan.cassandra_down_s)] * plan.cassandra_outages
    faults += [Fault(0.0, "s3proxy", "s3", plan.s3_down_s)] * plan.s3_outages
    candidates = zombie_candidates(stages)
    kinds = sorted(candidates)
    rng.shuffle(kinds)
    for i in range(plan.zombies if kinds else 0):
        stage = rng.choice(candidates[kinds[i % len(kinds)]])
        pause = plan.zombie_s if plan.zombie_s is not None else pauses.get(stage, 20.0)
        faults.append(Fault(0.0, stage, "zombie", pause))
    return faults


def _span(fault: Fault) -> float:
    """How long a fault keeps its target busy, with the target's start-up guessed."""
    return fault.down_s + RECOVERY_GUESS_S.get(fault.group, 2.0)


def stage_kind(process: str) -> str:
    """The stage a process belongs to: ``gatekeeper`` for ``gatekeeper-1``, ``renderer-<pool>`` for a
    renderer of that pool."""
    if process.startswith("renderer-"):
        return process.rsplit("-", 1)[0]
    return re.sub(r"-\d+$", "", process)


def one_of_each(stages: Sequence[str], rng: random.Random) -> list[str]:
    """One process of each stage, drawn with ``rng``, in the order of ``stages``."""
    kinds: dict[str, list[str]] = {}
    for stage in stages:
        kinds.setdefault(stage_kind(stage), []).append(stage)
    chosen = {rng.choice(processes) for processes in kinds.values()}
    return [s for s in stages if s in chosen]


def schedule(plan: ChaosPlan, stages: list[str], pauses: Mapping[str, float] | None = None) -> list[Fault]:
    """The fault schedule of ``plan``: deterministic given its seed (today's kinds are drawn as before,
    so an old seed replays the same kills and restarts). ``pauses``: stage -> zombie pause (see
    `zombie_pause_s`), used unless the plan names one."""
    rng = random.Random(plan.seed)
    window = (0.05 * plan.duration_s, 0.85 * plan.duration_s)
    targets = one_of_each(stages, random.Random(plan.seed + 4)) if plan.kill_one_of_each else stages
    faults = [Fault(rng.uniform(*window), stage) for stage in targets for _ in range(plan.kills_per_stage)]
    faults += [
        Fault(rng.uniform(*window), "broker", "broker-restart", plan.broker_down_s)
        for _ in range(plan.broker_restarts)
    ]
    busy: dict[str, list[tuple[float, float]]] = {}
    for f in faults:
        if f.kind != "kill":
            busy.setdefault(f.group, []).append((f.at_s, f.at_s + _span(f)))
    rng = random.Random(plan.seed + 2)
    placed: list[Fault] = []
    for f in _windows(plan, stages, pauses or {}):
        # A broker kill (placed first) meets no other fault's window, and no outage or zombie meets a
        # broker kill's: each kill is measured alone (`overlaps` then puts some faults together on purpose).
        if f.kind == "broker-kill":
            avoid = [w for ws in busy.values() for w in ws]
        else:
            kills = [(g.at_s, g.at_s + _span(g)) for g in placed if g.kind == "broker-kill"]
            avoid = busy.get(f.group, []) + kills
        at = _place(rng, avoid, window[0], window[1] - f.down_s, _span(f))
        busy.setdefault(f.group, []).append((at, at + _span(f)))
        placed.append(replace(f, at_s=at))
    placed = _overlap(rng, placed, plan.overlaps)
    return sorted(faults + placed, key=lambda f: f.at_s)


def _overlap(rng: random.Random, faults: list[Fault], count: int) -> list[Fault]:
    """Move ``count`` faults into the window of a fault of another target (seeded), where their own
    target is free then; the moved ones are not moved again and no window takes two."""
    faults = list(faults)
    order = list(range(len(faults)))
    rng.shuffle(order)
    used: set[int] = set()
    for i in order:
        if count <= 0:
            break
        if i in used:
            continue
        for j in order:
            host, guest = faults[j], faults[i]
            if j == i or j in used or host.group == guest.group:
                continue
            at = host.at_s + rng.uniform(0.2, 0.6) * max(host.down_s, 1.0)
            others = [f for k, f in enumerate(faults) if k != i and f.group == guest.group]
            if all(at + _span(guest) <= f.at_s or at >= f.at_s + _span(f) for f in others):
                pair = len(used) // 2 + 1
                faults[i] = replace(guest, at_s=at, pair=pair, after_s=at - host.at_s)
                faults[j] = replace(host, pair=pair)
                used.update((i, j))
                count -= 1
                break
    return faults


def workload(plan: ChaosPlan, model: str) -> list[tuple[float, GenerationRequest]]:
    """(submit time in seconds, request) for the run: images and videos at every priority. Each request's
    created_at is set when it is first sent."""
    rng = random.Random(plan.seed + 1)
    items = []
    for i in range(plan.requests):
        request = GenerationRequest(
            request_id=f"chaos-{plan.seed}-{i}",
            tenant_id=rng.choice(tenants(plan)),
            priority=rng.choice(("HIGH", "NORMAL", "LOW")),
            kind="IMAGE",
            prompt=f"chaos test {i}",
            model=model,
            width=64,
            height=64,
            steps=4,
            guidance_scale=7.5,
            created_at=0,
        )
        if rng.random() < 0.3:
            request = replace(request, kind="VIDEO", video=VideoSpec(num_frames=rng.choice((4, 6, 8)), fps=8))
        else:
            request = replace(request, num_images=rng.choice((1, 2)))
        items.append((rng.uniform(0, 0.9 * plan.duration_s), request))
    return sorted(items, key=lambda item: item[0])


def chaos_settings(settings: Settings, plan: ChaosPlan) -> Settings:
    """The run's unthrottled tenants and a sink watchdog inside the drain window (the run's own topic
    prefix, keyspace and gatekeeper group come from `running_pipeline`'s isolation); with zombies, a
    short share lock (``plan.share_lock_ms``), so a paused renderer's tasks go to another soon."""
    renderer = settings.renderer
    if plan.zombies:
        renderer = renderer.model_copy(update={"share_lock_ms": plan.share_lock_ms})
    return settings.model_copy(
        update={
            "gatekeeper": settings.gatekeeper.model_copy(
                update={
                    "tiers": {**settings.gatekeeper.tiers, "chaos": UNTHROTTLED},
                    "tenant_tiers": {
                        **settings.gatekeeper.tenant_tiers,
                        **dict.fromkeys(tenants(plan), "chaos"),
                    },
                    "tenant_inflight_cap": {},
                }
            ),
            # A sink stuck in a call restarts (its watchdog) well within the drain window.
            "assembler": settings.assembler.model_copy(update={"stall_timeout_s": STALL_RESTART_S}),
            "renderer": renderer,
        }
    )


@dataclass
class ChaosReport:
    """What a run did, what the delivery checker found afterwards and the figures of each fault."""

    plan: ChaosPlan
    submitted: list[str]
    kills: dict[str, int]
    broker_restarts: int
    drain_s: float | None  # from the last fault to the last request accounted for
    delivery: DeliveryReport | None = None
    windows: list[Window] = field(default_factory=list)  # each fault, as it happened
    figures: Figures | None = None
    errors: list[str] = field(default_factory=list)  # faults that could not be injected or undone
    priorities: dict[str, str] = field(default_factory=dict)  # request id -> class

    @property
    def ok(self) -> bool:
        """Whether the run drained and nothing was lost, duplicated or orphaned."""
        return self.delivery is not None and self.delivery.ok

    def counts(self) -> dict[str, int]:
        """How many fault windows of each kind there were (a kill's lasts until its successor is ready)."""
        return dict(Counter(w.kind for w in self.windows))

    def overlapping(self) -> int:
        """Pairs of fault windows that shared a moment."""
        return sum(1 for a, b in itertools.combinations(self.windows, 2) if a.overlaps(b))

    def summary(self) -> str:
        """The seed, the faults, the drain time, the figures and the checker's summary."""
        counts = ", ".join(f"{kind} {n}x" for kind, n in sorted(self.counts().items()))
        lines = [
            f"seed {self.plan.seed}: {len(self.submitted)} requests, "
            + ", ".join(f"{name} killed {n}x" for name, n in sorted(self.kills.items()))
            + f", broker restarted {self.broker_restarts}x",
            f"fault windows: {counts or 'none'}; {self.overlapping()} overlapping pair(s)",
            f"drained {self.drain_s:.1f} s after the last fault"
            if self.drain_s is not None
            else "did not drain",
        ]
        if self.figures is not None:
            lines += self.figures.lines()
        lines += [f"fault error: {e}" for e in self.errors]
        if self.delivery is not None:
            lines.append(self.delivery.summary())
        return "\n".join(lines)


def run_chaos(
    settings: Settings, plan: ChaosPlan, echo: Callable[[str], None] = print, attached: bool = False
) -> ChaosReport:
    """Run ``plan`` (bringing the infrastructure up, and down again if it was not running) and report."""
    echo(f"chaos seed {plan.seed} (replay with --seed {plan.seed})")
    for warning in ephemeral_clashes(settings):
        echo(warning)
    was_running = all(s.ready for s in status(settings))
    up(settings, attached=attached, echo=lambda _: None)
    try:
        with running_pipeline(
            chaos_settings(settings, plan),
            renderers=plan.renderers,
            replicas=plan.replicas,
            synthetic_ms=plan.synthetic_ms,
            isolate=f"chaos{plan.seed}",
            drop=not plan.keep,
            echo=lambda line: echo(f"  {line}"),
            max_backoff_s=1.0,
        ) as pipeline:
            return _Run(settings, pipeline, plan, echo, attached).run()
    finally:
        if not was_running:
            down(settings, echo=lambda _: None)


def ephemeral_clashes(settings: Settings, port_range: Path = EPHEMERAL_PORTS) -> list[str]:
    """Warnings for the services' ports inside the kernel's ephemeral port range: while a service is
    down, a client reconnecting to it may be given its port as its own (and even connect to itself), and
    the service then fails to start with "address already in use"."""
    found = ephemeral_range(port_range)
    if found is None:
        return []
    low, high = found
    return [
        f"warning: {service.name} port {port} is in the ephemeral port range {low}-{high}: restarting it "
        "may fail (address already in use); pick ports below it"
        for service in all_services(settings)
        for port in service.ports
        if low <= port <= high
    ]


def busiest_leader(leaders: Mapping[tuple[str, int], int], ends: Mapping[tuple[str, int], int]) -> int | None:
    """The broker leading the partitions that hold the most records (``leaders``: partition -> leader id,
    ``ends``: partition -> end offset); None when no partition has a leader."""
    load: Counter[int] = Counter()
    for tp, leader in leaders.items():
        if leader >= 0:
            load[leader] += ends.get(tp, 0)
    return max(sorted(load), key=lambda b: load[b]) if load else None


def broker_service(settings: Settings, node_id: int | None) -> str:
    """The launcher's name of broker ``node_id``: ``kafka`` when there is one broker, else ``kafka-<id>``
    (the first broker when the id is not known)."""
    names = [s.name for s in all_services(settings) if s.name.startswith("kafka")]
    if "kafka" in names or not names:
        return "kafka"
    wanted = f"kafka-{node_id}"
    return wanted if wanted in names else sorted(names)[0]


def leader_of_busiest(run: Settings, timeout_s: float = 5.0) -> int | None:
    """The broker leading the busiest partitions of the run's topics, from the admin client's metadata
    and end offsets; None when the cluster does not answer."""
    admin = make_admin(run)
    try:
        metadata = admin.list_topics(timeout=timeout_s)
        prefix = f"{run.kafka.topic_prefix}."
        leaders = {
            (topic, p): meta.partitions[p].leader
            for topic, meta in metadata.topics.items()
            if topic.startswith(prefix) and meta.error is None
            for p in meta.partitions
        }
        futures = admin.list_offsets(
            {TopicPartition(t, p): OffsetSpec.latest() for t, p in leaders}, request_timeout=timeout_s
        )
        ends = {(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()}
    except (KafkaException, ValueError):  # ValueError: no partitions to ask about
        return None
    return busiest_leader(leaders, ends)


class _Run:
    """One run's faults against a started pipeline: the event loop (stage kills and zombies on this
    thread, which also polls the supervisor and notes each stage exit), one thread per service outage,
    the submitter, the drain and the figures."""

    def __init__(
        self,
        settings: Settings,
        pipeline: RunningPipeline,
        plan: ChaosPlan,
        echo: Callable[[str], None],
        attached: bool,
    ) -> None:
        self.settings, self.plan, self.echo, self.attached = settings, plan, echo, attached
        self.run_settings, self.supervisor = pipeline.settings, pipeline.supervisor
        names = [s.name for s in self.supervisor.stages]
        pauses = {n: zombie_pause_s(self.run_settings, n, plan.zombie_margin_s) for n in names}
        self.faults = schedule(plan, names, pauses)
        self.report = ChaosReport(plan, [], dict.fromkeys(names, 0), 0, None)
        self.t0 = time.monotonic()
        self.mutex = threading.Lock()
        self.service_locks: dict[str, threading.Lock] = {}
        self.settled: dict[str, float] = {}  # service group -> when its last fault was over (monotonic)
        self.threads: list[threading.Thread] = []
        self.paused: dict[str, tuple[int, float, int]] = {}  # stage -> pid, resume (s from t0), since ms
        self.killed: set[int] = set()  # pids we SIGKILLed
        self.seen: set[int] = set()  # pids whose exit is noted
        self.exits: list[StageExit] = []
        self.recovering: dict[str, tuple[int, int]] = {}  # killed stage -> its killed pid, since ms
        self.outages: set[str] = set()  # services down (or coming back) now
        self.alone_until = 0.0  # while a broker kill is measured alone (monotonic), other faults wait
        self.hosts: dict[int, float] = {}  # pair -> when its host started (monotonic)
        self.guests_due: dict[int, float] = {}  # pair -> when its guest was first due (monotonic)
        self.submitted_until = 0

    def run(self) -> ChaosReport:
        """Submit the workload, inject the faults on schedule, wait for the drain, check delivery, and
        work out the figures."""
        self.echo("faults: " + ", ".join(_describe(f) for f in self.faults))
        started = now_ms()
        submitter = threading.Thread(target=self._submit_all, daemon=True)
        self.t0 = time.monotonic()
        submitter.start()
        try:
            self._inject()
        finally:
            for name, (pid, _, _) in list(self.paused.items()):  # never leave a stage stopped
                self._resume(name, pid)
        while submitter.is_alive() or any(t.is_alive() for t in self.threads):
            self._poll()
            time.sleep(0.1)
        last_fault = time.monotonic()
        self.report.drain_s, self.report.delivery = self._drain(last_fault, started)
        try:
            finished = _finished(self.run_settings, self.report, started)
        except KafkaException as exc:
            self.report.errors.append(f"figures: could not read completions ({exc})")
            finished = []
        self.report.figures = figures(
            self.report.windows, finished, (started, self.submitted_until or now_ms()), self.exits
        )
        return self.report

    def _poll(self) -> None:
        """Poll the supervisor (it restarts what died) and note each stage process that ended."""
        self.supervisor.poll()
        for name, child in self.supervisor.children.items():
            code, pid = child.proc.returncode, child.proc.pid
            if code is None or pid in self.seen:
                continue
            self.seen.add(pid)
            planned = pid in self.killed
            watchdog = not planned and watchdog_exit(_log_since(child.log, child.log_offset))
            self.exits.append(StageExit(name, code, planned, watchdog))
        for name, (pid, since) in list(self.recovering.items()):
            child = self.supervisor.children[name]
            if child.proc.pid != pid and child.ready:  # its successor answers /readyz: the kill is over
                self._recovered(name, since)

    def _recovered(self, name: str, since: int) -> None:
        """Close the window of the kill of ``name`` (killed at ``since``)."""
        del self.recovering[name]
        self.report.windows.append(Window("kill", name, since, now_ms()))

    def _wait_until(self, at_s: float) -> None:
        while time.monotonic() - self.t0 < at_s:
            self._poll()
            time.sleep(0.1)

    def _inject(self) -> None:
        """Fire the faults in time order; a zombie's resume and a kill put off by a zombie are events too."""
        events = [(f.at_s, i, f) for i, f in enumerate(self.faults)]
        heapq.heapify(events)
        seq = itertools.count(len(events))
        while events:
            at_s, _, fault = heapq.heappop(events)
            self._wait_until(at_s)
            later = self._fire(fault)
            if later is not None:
                heapq.heappush(events, (later.at_s, next(seq), later))

    def _fire(self, fault: Fault) -> Fault | None:
        """Inject ``fault``; the event to come of it, if any (a resume, or a kill put off)."""
        if fault.kind in SERVICE_KINDS:
            lock = self.service_locks.setdefault(fault.group, threading.Lock())
            thread = threading.Thread(target=self._outage, args=(fault, lock), daemon=True)
            self.threads.append(thread)
            thread.start()
            return None
        if fault.kind == "resume":
            paused_pid, _, since = self.paused[fault.target]
            self._resume(fault.target, paused_pid)
            self.report.windows.append(Window("zombie", fault.target, since, now_ms()))
            return None
        if fault.target in self.paused:  # not while it is a zombie: after it resumed
            return replace(fault, at_s=self.paused[fault.target][1] + 1.0)
        pid = self._alive_pid(fault.target)
        if pid is None:
            self.echo(f"  {fault.target} is not running: skipping its {fault.kind}")
            return None
        return self._hit(fault, pid)

    def _hit(self, fault: Fault, pid: int) -> Fault | None:
        """Kill or pause stage process ``pid`` for ``fault``, or put the fault off while a broker kill is
        measured alone; the event to come of it, if any."""
        with self.mutex:  # a lone broker kill starts only when no stage is killed or paused
            now = time.monotonic()
            wait = self._hold_s(fault, now)
            if wait:  # after its host started, or after the broker kill measured alone
                return replace(fault, at_s=now - self.t0 + wait)
            self._started(fault, now)
            if fault.kind == "zombie":
                self.supervisor.signal(fault.target, signal.SIGSTOP)
                resume_s = time.monotonic() - self.t0 + fault.down_s
                self.paused[fault.target] = (pid, resume_s, now_ms())
                self.echo(f"  SIGSTOP {fault.target} for {fault.down_s:.0f} s (a zombie)")
                return Fault(resume_s, fault.target, "resume")
            if fault.target in self.recovering:  # killed again before it was back: that kill is over now
                self._recovered(fault.target, self.recovering[fault.target][1])
            self.killed.add(pid)
            self.recovering[fault.target] = (pid, now_ms())
            self.supervisor.signal(fault.target, signal.SIGKILL)
        self.report.kills[fault.target] += 1
        self.echo(f"  SIGKILL {fault.target}")
        return None

    def _alive_pid(self, name: str) -> int | None:
        """The pid of stage ``name``, waiting (up to 10 s) for it to be alive if it is restarting."""
        for _ in range(100):
            if name in self.supervisor.alive():
                return self.supervisor.children[name].proc.pid
            self._poll()
            time.sleep(0.1)
        return None

    def _resume(self, name: str, pid: int) -> None:
        """SIGCONT the zombie ``name`` (if its process is still the one paused)."""
        del self.paused[name]
        child = self.supervisor.children[name]
        if child.proc.pid == pid and child.proc.poll() is None:
            child.proc.send_signal(signal.SIGCONT)
            self.echo(f"  SIGCONT {name}")

    def _outage(self, fault: Fault, lock: threading.Lock) -> None:
        """A service fault, on a thread of its own: take the service down, wait, start it again (from the
        long-lived starter thread) and record its window. One fault per service at a time, `SETTLE_S`
        apart."""
        with lock:
            time.sleep(max(0.0, self.settled.get(fault.group, 0.0) + SETTLE_S - time.monotonic()))
            alone = self._take_turn(fault)
            try:
                start = now_ms()
                name = self._take_down(fault)
                time.sleep(fault.down_s)
                self._start_again(name)
            except Exception as exc:  # noqa: BLE001 - said in the report; the drain shows the damage
                self.echo(f"  {fault.kind} failed: {exc}")
                with self.mutex:
                    self.report.errors.append(f"{fault.kind} at {fault.at_s:.0f} s: {exc}")
                return
            finally:
                with self.mutex:
                    self.outages.discard(fault.group)
                    if alone:
                        self.alone_until = time.monotonic() + ALONE_AFTER_S
            self.settled[fault.group] = time.monotonic()
            window = Window(fault.kind, name, start, now_ms())
            self.echo(f"  {name} back after {window.seconds:.1f} s ({fault.kind})")
            with self.mutex:
                self.report.windows.append(window)
                if fault.kind == "broker-restart":
                    self.report.broker_restarts += 1

    def _take_turn(self, fault: Fault) -> bool:
        """Wait until ``fault`` may start and mark it in progress. A broker kill that is not combined on
        purpose waits (up to `QUIET_WAIT_S`) until no other fault is in progress, then holds the others off
        until it is over; any other fault not combined on purpose waits while such a kill is in progress.
        Whether ``fault`` is such a lone kill."""
        alone = fault.kind == "broker-kill" and not fault.combined and self.plan.broker_kills_alone
        deadline = time.monotonic() + QUIET_WAIT_S
        while True:
            with self.mutex:
                now = time.monotonic()
                if alone:
                    busy = bool(self.recovering or self.paused or self.outages) and now <= deadline
                else:
                    busy = self._hold_s(fault, now) > 0
                if not busy:
                    self._started(fault, now)
                    self.outages.add(fault.group)
                    if alone:
                        self.alone_until = float("inf")
                    return alone
            time.sleep(0.1)

    def _hold_s(self, fault: Fault, now: float) -> float:
        """Seconds a fault other than a lone broker kill still waits: a combined guest until ``after_s``
        past its host's start (at most `PAIR_WAIT_S` after it was first due), a host not at all; any other
        fault while a lone broker kill holds the others off. Called under the mutex."""
        if not fault.combined:
            return 1.0 if now < self.alone_until else 0.0
        if not fault.after_s:
            return 0.0
        due = self.guests_due.setdefault(fault.pair, now)
        if fault.pair in self.hosts:
            return max(0.0, self.hosts[fault.pair] + fault.after_s - now)
        return 0.2 if now - due < PAIR_WAIT_S else 0.0

    def _started(self, fault: Fault, now: float) -> None:
        """Note that ``fault`` starts now (a host's guest counts from here). Called under the mutex."""
        if fault.combined and not fault.after_s:
            self.hosts[fault.pair] = now

    def _start_again(self, name: str) -> None:
        """Start service ``name`` again from the long-lived starter thread; a failed start (its log tail is
        echoed) is tried again, up to `START_TRIES` times."""
        for attempt in range(1, START_TRIES + 1):
            try:
                _STARTER.submit(
                    up, self.settings, attached=self.attached, only=[name], echo=lambda _: None
                ).result()
                return
            except InfraError as exc:
                if attempt == START_TRIES:
                    raise
                self.echo(f"  {name} did not start (try {attempt} of {START_TRIES}): {exc}")

    def _take_down(self, fault: Fault) -> str:
        """Stop or kill the service of ``fault``; its launcher name."""
        quiet: Callable[[str], None] = lambda _: None  # noqa: E731
        if fault.kind in ("broker-restart", "broker-kill"):
            name = broker_service(self.settings, leader_of_busiest(self.run_settings))
            if fault.kind == "broker-kill":
                self.echo(f"  SIGKILL broker {name} (leads the busiest partitions) for {fault.down_s:.0f} s")
                kill(self.settings, name, timeout_s=30.0)  # and wait until it is gone
                return name
            self.echo(f"  stopping broker {name} for {fault.down_s:.0f} s")
        else:
            name = fault.target
            self.echo(f"  stopping {name} for {fault.down_s:.0f} s")
        down(self.settings, only=[name], echo=quiet)
        return name

    def _submit_all(self) -> None:
        run, plan, report = self.run_settings, self.plan, self.report
        t0 = time.monotonic()
        with Client(run) as client:
            for at_s, planned in workload(plan, next(iter(run.models))):
                time.sleep(max(0.0, at_s - (time.monotonic() - t0)))
                # Created when first sent: a request the broker could not take waits from then on.
                request = replace(planned, created_at=now_ms())
                while True:  # the broker may be down: a request counts once the broker acknowledged it
                    try:
                        client.submit(request, timeout_s=10)
                        report.submitted.append(request.request_id)
                        report.priorities[request.request_id] = str(request.priority)
                        break
                    except DeliveryError as exc:
                        self.echo(f"  submit of {request.request_id} not acknowledged ({exc}); trying again")
                        time.sleep(1.0)
        self.submitted_until = now_ms()

    def _drain(self, last_fault: float, since_ms: int) -> tuple[float | None, DeliveryReport]:
        """Wait until every submitted request is accounted for; the checker's final report.

        When the count of unfinished requests stops moving for `STALL_S`, every stage is asked for its
        threads' stacks (SIGUSR1, see `aigc.cli`); if the run then fails to drain, the stacks that show
        the project's own code are printed with the lost requests' last status, so a hang can be located
        from the output alone."""
        run, report, echo = self.run_settings, self.report, self.echo
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        unfinished: int | None = None
        moved_at = time.monotonic()
        dumps: dict[str, int] = {}  # stage -> its log's size when asked for stacks
        while True:
            self._poll()
            try:
                delivery = check_delivery(run, report.submitted, tenants(report.plan), since_ms=since_ms)
            except CHECK_ERRORS as exc:  # a service just restarted may refuse queries for a moment
                echo(f"  delivery check failed ({type(exc).__name__}: {exc}); checking again")
            else:
                if not delivery.lost:
                    return time.monotonic() - last_fault, delivery
                if len(delivery.lost) != unfinished:
                    unfinished, moved_at = len(delivery.lost), time.monotonic()
                    echo(f"  {unfinished} request(s) not finished yet")
            if time.monotonic() > deadline:
                final = check_delivery(
                    run, report.submitted, tenants(report.plan), since_ms=since_ms, read_status=True
                )
                for name, offset in dumps.items():
                    echo(_project_stacks(name, self.supervisor.log_dir / f"{name}.log", offset))
                return None, final
            if not dumps and time.monotonic() - moved_at > STALL_S:
                echo(f"  no progress for {STALL_S:.0f} s: every stage writes its stacks to its log")
                dumps = _ask_for_stacks(self.supervisor)
            pause = time.monotonic() + CHECK_EVERY_S
            while time.monotonic() < pause:
                self._poll()
                time.sleep(0.2)


def _describe(fault: Fault) -> str:
    """``target@12s`` for a kill, ``kind target@12s+20s`` for a fault with a duration."""
    if fault.kind == "kill":
        return f"{fault.target}@{fault.at_s:.0f}s"
    combined = " (combined)" if fault.combined else ""
    return f"{fault.kind} {fault.target}@{fault.at_s:.0f}s+{fault.down_s:.0f}s{combined}"


def _log_since(log: Path, offset: int, limit: int = 64 * 1024) -> str:
    """The last ``limit`` bytes of ``log`` written after ``offset`` (a process's own part of its log)."""
    try:
        with log.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(offset, f.tell() - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _finished(run: Settings, report: ChaosReport, since_ms: int) -> list[Finished]:
    """The run's completed requests (their first completion, timed when it was published) with, for HIGH
    ones, their first render's start (the earliest ``started_at`` of their FramesRendered)."""
    topics, codec = Topics(run), default_codec()
    wanted = set(report.submitted)
    done: dict[str, tuple[Completion, int]] = {}
    for msg in BoundedRead(run, [topics.completions], since_ms, role="chaos"):
        try:
            completion = codec.read(msg.value(), Completion)
        except DecodeError:
            continue
        if completion.request_id in wanted:
            done.setdefault(completion.request_id, (completion, msg.timestamp()[1]))
    starts: dict[str, int] = {}
    for msg in BoundedRead(run, [topics.frames("HIGH")], since_ms, role="chaos"):
        try:
            frames = codec.read(msg.value(), FramesRendered)
        except DecodeError:
            continue
        if frames.started_at > 0:
            starts[frames.request_id] = min(
                starts.get(frames.request_id, frames.started_at), frames.started_at
            )
    return [
        Finished(i, report.priorities.get(i, "?"), c.created_at, published, starts.get(i))
        for i, (c, published) in done.items()
    ]


def _ask_for_stacks(supervisor: Supervisor) -> dict[str, int]:
    """Signal every live stage to write its threads' stacks to its log; stage -> its log's size before."""
    dumps = {}
    for name in supervisor.alive():
        dumps[name] = (supervisor.log_dir / f"{name}.log").stat().st_size
        supervisor.signal(name, signal.SIGUSR1)
    return dumps


def _project_stacks(name: str, log: Path, offset: int) -> str:
    """The threads of a faulthandler dump in ``log`` (written after ``offset``) that run project code."""
    with log.open("rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    threads: list[list[str]] = []
    for line in lines:
        if line.startswith(("Current thread 0x", "Thread 0x")):
            threads.append([line])
        elif line.startswith("  File ") and threads:
            threads[-1].append(line)
    root = str(Path(__file__).resolve().parent.parent)
    ours = [t for t in threads if any(root in f and "site-packages" not in f for f in t[1:])]
    header = f"  {name}: {len(ours)} of {len(threads)} threads run project code"
    return "\n".join([header, *(line for thread in ours for line in thread)])
