"""`aigc chaos`: kill every stage and restart the broker while requests flow, then account for every request.

The pipeline's real stage processes run under the supervisor on their own topic prefix and keyspace
(the synthetic backend renders, so hundreds of requests fit in minutes). A workload of images and
videos at every priority is submitted over the run; on a schedule drawn from one seed (printed, so a
failure can be replayed with ``--seed``) every stage process is killed with SIGKILL several times and
restarted by the supervisor, and the broker is stopped and started again. When the workload and the
faults are over, the run waits for the pipeline to drain and the delivery checker reports lost
requests, duplicate completions and orphans. Exit status 0 only when all three are zero.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from confluent_kafka import KafkaException

from infra.launcher import down, status, up
from infra.pipeline import RunningPipeline, running_pipeline
from plumbing.clock import now_ms
from plumbing.errors import DeliveryError
from plumbing.settings import Settings, Tier
from plumbing.supervisor import Supervisor
from producers.checker import DeliveryReport, check_delivery
from producers.client import Client
from schemas.records import GenerationRequest, VideoSpec

DRAIN_TIMEOUT_S = 300.0
CHECK_EVERY_S = 5.0
STALL_S = 60.0  # no request finished for this long: ask every stage for its stacks
STALL_RESTART_S = 90.0
# A run's tenants are its own (results live under their S3 prefixes) and unthrottled: after a broker
# outage the submitter sends what fell due meanwhile in a burst, which rate limits would rightly refuse.
UNTHROTTLED = Tier(requests_per_s=1e6, request_burst=1e6, cost_per_s=1e18, cost_burst=1e18)


@dataclass(frozen=True)
class ChaosPlan:
    """What a chaos run does: its workload, its faults and the seed both are drawn from."""

    requests: int = 200
    duration_s: float = 90.0  # submissions and faults happen within this window
    kills_per_stage: int = 3
    broker_restarts: int = 2
    renderers: int = 2
    synthetic_ms: float = 20.0
    seed: int = field(default_factory=lambda: random.SystemRandom().randrange(1_000_000))
    broker_down_s: float = 3.0  # how long each broker restart keeps it stopped (its start-up comes on top)


def tenants(plan: ChaosPlan) -> tuple[str, ...]:
    """The run's own tenants (their results live under their own S3 prefixes)."""
    return tuple(f"chaos-{plan.seed}-{name}" for name in "abc")


@dataclass(frozen=True)
class Fault:
    """One fault of the schedule: when, in seconds from the start, and what is killed or restarted."""

    at_s: float
    target: str  # a stage process name, or "broker"


@dataclass
class ChaosReport:
    """What a run did and what the delivery checker found afterwards."""

    plan: ChaosPlan
    submitted: list[str]
    kills: dict[str, int]
    broker_restarts: int
    drain_s: float | None  # from the last fault to the last request accounted for
    delivery: DeliveryReport | None = None

    @property
    def ok(self) -> bool:
        """Whether the run drained and nothing was lost, duplicated or orphaned."""
        return self.delivery is not None and self.delivery.ok

    def summary(self) -> str:
        """The seed, the faults, the drain time and the checker's summary."""
        lines = [
            f"seed {self.plan.seed}: {len(self.submitted)} requests, "
            + ", ".join(f"{name} killed {n}x" for name, n in sorted(self.kills.items()))
            + f", broker restarted {self.broker_restarts}x",
            f"drained {self.drain_s:.1f} s after the last fault"
            if self.drain_s is not None
            else "did not drain",
        ]
        if self.delivery is not None:
            lines.append(self.delivery.summary())
        return "\n".join(lines)


def schedule(plan: ChaosPlan, stages: list[str]) -> list[Fault]:
    """The fault schedule of ``plan``: deterministic given its seed."""
    rng = random.Random(plan.seed)
    window = (0.05 * plan.duration_s, 0.85 * plan.duration_s)
    faults = [Fault(rng.uniform(*window), stage) for stage in stages for _ in range(plan.kills_per_stage)]
    faults += [Fault(rng.uniform(*window), "broker") for _ in range(plan.broker_restarts)]
    return sorted(faults, key=lambda f: f.at_s)


def workload(plan: ChaosPlan, model: str) -> list[tuple[float, GenerationRequest]]:
    """(submit time in seconds, request) for the run: images and videos at every priority. Each request's
    created_at is set when it is sent."""
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
    prefix, keyspace and gatekeeper group come from `running_pipeline`'s isolation)."""
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
        }
    )


def run_chaos(
    settings: Settings, plan: ChaosPlan, echo: Callable[[str], None] = print, attached: bool = False
) -> ChaosReport:
    """Run ``plan`` (bringing the infrastructure up, and down again if it was not running) and report."""
    echo(f"chaos seed {plan.seed} (replay with --seed {plan.seed})")
    was_running = all(s.ready for s in status(settings))
    up(settings, attached=attached, echo=lambda _: None)
    try:
        with running_pipeline(
            chaos_settings(settings, plan),
            renderers=plan.renderers,
            synthetic_ms=plan.synthetic_ms,
            isolate=f"chaos{plan.seed}",
            echo=lambda line: echo(f"  {line}"),
            max_backoff_s=1.0,
        ) as pipeline:
            return _run_faults(settings, pipeline, plan, echo, attached)
    finally:
        if not was_running:
            down(settings, echo=lambda _: None)


def _run_faults(
    settings: Settings,
    pipeline: RunningPipeline,
    plan: ChaosPlan,
    echo: Callable[[str], None],
    attached: bool,
) -> ChaosReport:
    """Submit the workload, inject the faults on schedule, wait for the drain and check delivery."""
    run, supervisor = pipeline.settings, pipeline.supervisor
    names = [s.name for s in supervisor.stages]
    faults = schedule(plan, names)
    echo("faults: " + ", ".join(f"{f.target}@{f.at_s:.0f}s" for f in faults))
    report = ChaosReport(plan, [], dict.fromkeys(names, 0), 0, None)
    started = now_ms()
    submitter = threading.Thread(target=_submit_all, args=(run, plan, report, echo), daemon=True)
    t0 = time.monotonic()
    submitter.start()
    last_fault = t0
    for fault in faults:
        while time.monotonic() - t0 < fault.at_s:
            supervisor.poll()
            time.sleep(0.1)
        if fault.target == "broker":
            _restart_broker(settings, supervisor, echo, attached, plan.broker_down_s)
            report.broker_restarts += 1
        else:
            _kill(supervisor, fault.target, echo)
            report.kills[fault.target] += 1
        last_fault = time.monotonic()
    while submitter.is_alive():
        supervisor.poll()
        time.sleep(0.1)
    report.drain_s, report.delivery = _drain(run, report, supervisor, last_fault, started, echo)
    return report


def _submit_all(run: Settings, plan: ChaosPlan, report: ChaosReport, echo: Callable[[str], None]) -> None:
    t0 = time.monotonic()
    with Client(run) as client:
        for at_s, request in workload(plan, next(iter(run.models))):
            time.sleep(max(0.0, at_s - (time.monotonic() - t0)))
            while True:  # the broker may be down: a request counts once the broker acknowledged it
                try:
                    client.submit(replace(request, created_at=now_ms()), timeout_s=10)
                    report.submitted.append(request.request_id)
                    break
                except DeliveryError as exc:
                    echo(f"  submit of {request.request_id} not acknowledged ({exc}); trying again")
                    time.sleep(1.0)


def _kill(supervisor: Supervisor, name: str, echo: Callable[[str], None]) -> None:
    """SIGKILL stage process ``name``, waiting (up to 10 s) for it to be alive if it is restarting."""
    for _ in range(100):  # if it is between a crash and its restart, wait for it to be back
        if name in supervisor.alive():
            supervisor.signal(name, signal.SIGKILL)
            echo(f"  SIGKILL {name}")
            return
        supervisor.poll()
        time.sleep(0.1)


def _restart_broker(
    settings: Settings, supervisor: Supervisor, echo: Callable[[str], None], attached: bool, down_s: float
) -> None:
    """Stop the broker for ``down_s`` seconds (the stages keep being supervised), then start it again."""
    echo("  stopping the broker")
    down(settings, only=["kafka"], echo=lambda _: None)
    pause = time.monotonic() + down_s
    while time.monotonic() < pause:
        supervisor.poll()
        time.sleep(0.1)
    up(settings, only=["kafka"], attached=attached, echo=lambda _: None)
    echo("  broker back")


def _drain(
    run: Settings, report: ChaosReport, supervisor: Supervisor, last_fault: float, since_ms: int,
    echo: Callable[[str], None],
) -> tuple[float | None, DeliveryReport]:  # fmt: skip
    """Wait until every submitted request is accounted for; the checker's final report.

    When the count of unfinished requests stops moving for `STALL_S`, every stage is asked for its
    threads' stacks (SIGUSR1, see `aigc.cli`); if the run then fails to drain, the stacks that show
    the project's own code are printed with the lost requests' last status, so a hang can be located
    from the output alone."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    unfinished: int | None = None
    moved_at = time.monotonic()
    dumps: dict[str, int] = {}  # stage -> its log's size when asked for stacks
    while True:
        supervisor.poll()
        try:
            delivery = check_delivery(run, report.submitted, tenants(report.plan), since_ms=since_ms)
        except KafkaException as exc:  # a broker just restarted may refuse offset queries for a moment
            echo(f"  delivery check failed ({exc.args[0].str()}); checking again")
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
                echo(_project_stacks(name, supervisor.log_dir / f"{name}.log", offset))
            return None, final
        if not dumps and time.monotonic() - moved_at > STALL_S:
            echo(f"  no progress for {STALL_S:.0f} s: every stage writes its stacks to its log")
            dumps = _ask_for_stacks(supervisor)
        pause = time.monotonic() + CHECK_EVERY_S
        while time.monotonic() < pause:
            supervisor.poll()
            time.sleep(0.2)


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
