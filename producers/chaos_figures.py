"""The figures of a chaos run: throughput, HIGH queue wait and completion gaps per fault, next to the
steady state outside faults, and the stage exits nobody planned (watchdog restarts among them).

Pure functions over what the run recorded (`Window` per fault, `Finished` per completed request,
`StageExit` per stage process that ended), so they are tested without a pipeline. Times are epoch
milliseconds, as the records carry them.

- A fault's **window** runs from the moment it was injected (the service stopped or killed, the stage
  killed or paused) to the moment it was over (the service answering clients again, the killed stage's
  successor ready, the paused stage resumed).
- **Throughput** of a span: completions published in it (their record's timestamp), per second.
- **HIGH queue wait**: from a HIGH request's ``created_at`` to the start of its first render
  (``FramesRendered.started_at``), for the HIGH requests created in the span.
- **Longest gap** of a window: the longest time between two consecutive completions with the window
  between or around them (a gap that starts before the fault and ends after it counts in full).
- The **steady state** is the submission period outside every fault window.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

WATCHDOG_MARKS = (
    "Timeout (",  # faulthandler.dump_traceback_later(exit=True): a stage's Watchdog fired
    "no progress for",  # the gatekeeper's stall guard
)


@dataclass(frozen=True)
class Window:
    """One fault as it happened: its kind, what it hit and when (epoch ms)."""

    kind: str  # kill, broker-kill, broker-restart, cassandra, s3, zombie
    target: str  # the service (kafka, kafka-2, cassandra, s3proxy) or the paused stage
    start_ms: int
    end_ms: int

    @property
    def seconds(self) -> float:
        """How long the fault lasted."""
        return max(0, self.end_ms - self.start_ms) / 1000

    def overlaps(self, other: Window) -> bool:
        """Whether the two windows share a moment."""
        return self.start_ms < other.end_ms and other.start_ms < self.end_ms


@dataclass(frozen=True)
class Finished:
    """One completed request: its class, when it was created, first rendered and finished (epoch ms)."""

    request_id: str
    priority: str
    created_at: int
    # When its Completion was published: the record's timestamp on the completions topic. Not the
    # Completion's own finished_at, which is when the sink first decided it (its Cassandra row) and can be
    # many seconds earlier when the transaction that published it was retried.
    finished_at: int
    render_start: int | None = None  # None: never rendered (rejected, or decided before a render)

    @property
    def queue_wait_ms(self) -> int | None:
        """From creation to the first render's start."""
        return None if self.render_start is None else max(0, self.render_start - self.created_at)


@dataclass(frozen=True)
class StageExit:
    """A stage process that ended during the run, with its exit code and why, as far as we can tell."""

    stage: str
    code: int
    planned: bool  # we SIGKILLed it
    watchdog: bool  # its log says its watchdog (or the gatekeeper's stall guard) ended it


def watchdog_exit(log_text: str) -> bool:
    """Whether a stage's log since its start shows that its watchdog ended it."""
    return any(mark in log_text for mark in WATCHDOG_MARKS)


@dataclass(frozen=True)
class Period:
    """The figures of one span: a fault window, or the steady state outside them."""

    label: str
    seconds: float
    completions: int
    high_waits_ms: tuple[int, ...]
    longest_gap_s: float | None  # fault windows only (and the steady state's longest gap)
    overlapping: tuple[str, ...] = ()  # the other faults in progress meanwhile ("<kind> <target>")
    kind: str = ""  # the fault's kind; "" for the steady state

    @property
    def rate(self) -> float:
        """Completions per second."""
        return self.completions / self.seconds if self.seconds > 0 else 0.0

    def high_wait(self) -> str:
        """``p50/max s (n)`` of the HIGH queue waits, or ``-``."""
        if not self.high_waits_ms:
            return "-"
        p50 = statistics.median(self.high_waits_ms) / 1000
        return f"{p50:.2f}/{max(self.high_waits_ms) / 1000:.2f} s ({len(self.high_waits_ms)})"

    def line(self) -> str:
        """One row of the figures table: the overlapping faults named, stage kills counted."""
        gap = "-" if self.longest_gap_s is None else f"{self.longest_gap_s:.1f} s"
        named = list(dict.fromkeys(o for o in self.overlapping if not o.startswith("kill ")))
        kills = len(self.overlapping) - sum(1 for o in self.overlapping if not o.startswith("kill "))
        also = ", ".join(named + ([f"{kills} stage kill(s)"] if kills else []))
        also = f"  with {also}" if also else ""
        return (
            f"  {self.label:<30} {self.seconds:>7.1f} s {self.rate:>7.2f}/s  "
            f"{self.high_wait():<24} {gap:>8}{also}"
        )


@dataclass(frozen=True)
class Figures:
    """Each fault window's figures and the steady state's, and the stage exits."""

    faults: list[Period]
    steady: Period
    exits: list[StageExit] = field(default_factory=list)

    @property
    def watchdog_restarts(self) -> int:
        """Stage processes their watchdog ended (the supervisor restarted each)."""
        return sum(1 for e in self.exits if e.watchdog)

    @property
    def lone_broker_kill_gaps(self) -> list[float | None]:
        """The longest completion gap of each broker kill no other fault window met."""
        return [p.longest_gap_s for p in self.faults if p.kind == "broker-kill" and not p.overlapping]

    @property
    def unplanned_exits(self) -> list[StageExit]:
        """Stage processes that ended without our SIGKILL, watchdog exits included."""
        return [e for e in self.exits if not e.planned]

    def lines(self) -> list[str]:
        """The figures table, then the watchdog and exit counts."""
        header = f"  {'fault':<30} {'window':>9} {'done/s':>9}  {'HIGH wait p50/max (n)':<24} {'gap':>8}"
        lines = ["throughput, HIGH queue wait and longest completion gap per fault:", header]
        lines += [p.line() for p in self.faults if p.kind != "kill"]
        kills = [p for p in self.faults if p.kind == "kill"]
        if kills:
            ready = sorted(p.seconds for p in kills)
            lines.append(
                f"  stage kills: {len(kills)}, successor ready after p50 {statistics.median(ready):.1f} s, "
                f"max {ready[-1]:.1f} s (each kill is a fault window: the steady state leaves them out)"
            )
        alone = self.lone_broker_kill_gaps
        if alone:
            lines.append(
                f"  broker kills alone: {len(alone)}, longest gap in each: "
                + ", ".join("-" if g is None else f"{g:.1f} s" for g in alone)
            )
        lines.append(self.steady.line())
        by_stage: dict[str, int] = {}
        for e in self.exits:
            if e.watchdog:
                by_stage[e.stage] = by_stage.get(e.stage, 0) + 1
        detail = ", ".join(f"{s} {n}x" for s, n in sorted(by_stage.items()))
        lines.append(f"watchdog restarts: {self.watchdog_restarts}" + (f" ({detail})" if detail else ""))
        others = [e for e in self.unplanned_exits if not e.watchdog]
        lines.append(
            f"other unplanned stage exits: {len(others)}"
            + (f" ({', '.join(f'{e.stage} code {e.code}' for e in others)})" if others else "")
        )
        return lines


def _in(t: int, start: int, end: int) -> bool:
    return start <= t < end


def longest_gap_ms(finished_at: Sequence[int], start: int, end: int) -> int | None:
    """The longest time between consecutive completions (sorted ``finished_at``) that meets [start, end)."""
    gaps = [b - a for a, b in itertools.pairwise(finished_at) if b > start and a < end]
    return max(gaps) if gaps else None


def _steady_spans(active: tuple[int, int], windows: Iterable[Window]) -> list[tuple[int, int]]:
    """The parts of ``active`` outside every window."""
    spans = [active]
    for w in windows:
        cut = []
        for a, b in spans:
            if w.end_ms <= a or w.start_ms >= b:
                cut.append((a, b))
                continue
            if w.start_ms > a:
                cut.append((a, w.start_ms))
            if w.end_ms < b:
                cut.append((w.end_ms, b))
        spans = cut
    return spans


def figures(
    windows: Sequence[Window],
    finished: Sequence[Finished],
    active: tuple[int, int],
    exits: Sequence[StageExit] = (),
) -> Figures:
    """The run's figures: a `Period` per fault window (in time order) and one for the steady state, the
    submission period ``active`` (epoch ms, start and end) outside every window."""
    times = sorted(f.finished_at for f in finished)
    high = [f for f in finished if f.priority == "HIGH" and f.queue_wait_ms is not None]
    periods = []
    for w in sorted(windows, key=lambda w: w.start_ms):
        gap = longest_gap_ms(times, w.start_ms, w.end_ms)
        periods.append(
            Period(
                label=f"{w.kind} {w.target}",
                seconds=w.seconds,
                completions=sum(1 for t in times if _in(t, w.start_ms, w.end_ms)),
                high_waits_ms=tuple(
                    f.queue_wait_ms or 0 for f in high if _in(f.created_at, w.start_ms, w.end_ms)
                ),
                longest_gap_s=None if gap is None else gap / 1000,
                overlapping=tuple(f"{o.kind} {o.target}" for o in windows if o is not w and o.overlaps(w)),
                kind=w.kind,
            )
        )
    spans = _steady_spans(active, windows)
    steady_gaps = [b - a for a, b in itertools.pairwise(times) if any(s <= a and b <= e for s, e in spans)]
    steady = Period(
        label="steady state (outside faults)",
        seconds=sum(b - a for a, b in spans) / 1000,
        completions=sum(1 for t in times if any(_in(t, a, b) for a, b in spans)),
        high_waits_ms=tuple(
            f.queue_wait_ms or 0 for f in high if any(_in(f.created_at, a, b) for a, b in spans)
        ),
        longest_gap_s=max(steady_gaps) / 1000 if steady_gaps else None,
    )
    return Figures(periods, steady, list(exits))
