"""Where the CPU goes while a scenario runs: each stage's share of a core and its hottest code.

    python -m bench.profile --only B2 --seconds 20

Runs ``aigc bench --quick --only <scenario>``, waits until its load is on, then for ``--seconds`` samples
the Python threads of every stage process while they hold the GIL (py-spy ``--gil``, in parallel,
without stopping them) and reads each process's CPU time from /proc over the same window. It prints,
per stage, the share of one core it used and where its busy samples fell (our innermost function and
the library call it was in), so the stage that holds a target back, and the part of it, can be read off.
The scenario's own figures are in its usual report (printed path).
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from infra.launcher import owned_pid
from infra.services import all_services
from plumbing.settings import Settings

STAGES = ("gatekeeper", "assemble", "render", "relay")
OWN = ("plumbing/", "schemas/", "producers/", "stream_processors/", "gpu_consumers/")
HZ = os.sysconf("SC_CLK_TCK")


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (from the parent pids in /proc)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def stage_of(pid: int) -> str | None:
    """The pipeline stage ``pid`` runs (``python -m aigc <stage>``), or None."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    words = [a.decode() for a in argv]
    if "aigc" not in words:
        return None
    verb = words[words.index("aigc") + 1]
    return verb if verb in STAGES else None


def services(settings: Settings) -> dict[int, str]:
    """The local infrastructure's JVMs that are running, by pid."""
    pids = {service.name: owned_pid(service) for service in all_services(settings)}
    return {pid: name for name, pid in pids.items() if pid is not None}


def cpu_ticks(pid: int) -> int:
    """User + system clock ticks of ``pid`` so far; 0 once it has exited (a window that outlives a
    process counts what the process used before it)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0
    return int(fields[11]) + int(fields[12])


def hot_spots(raw: Path) -> tuple[int, collections.Counter[str]]:
    """Samples, and how many fell in each (deepest own function -> the library call it was in).

    py-spy's raw output is one line per distinct stack, frames outermost first, then a count. A sample
    is charged to the innermost frame of our own code and the first library frame below it, so both
    "which of our functions" and "spent in which library" can be read off one line.
    """
    total, spots = 0, collections.Counter[str]()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        frames = stack.split(";")
        own = [i for i, frame in enumerate(frames) if frame.rsplit("(", 1)[-1].startswith(OWN)]
        if not own:
            spots["(library threads) " + _name(frames[-1])] += int(count)
            continue
        inner = own[-1]
        below = _name(frames[inner + 1]) if inner + 1 < len(frames) else "itself"
        spots[f"{_name(frames[inner])} -> {below}"] += int(count)
    return total, spots


def _name(frame: str) -> str:
    """A py-spy frame as ``function (file)``, without its line number."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rstrip(')').rsplit(':', 1)[0]})"


def _stages(bench: subprocess.Popen[bytes]) -> dict[int, str]:
    """The scenario's stage processes (pid -> stage) once they appear; empty if they never do."""
    stages: dict[int, str] = {}
    deadline = time.monotonic() + 300
    while not stages and time.monotonic() < deadline and bench.poll() is None:
        time.sleep(1)
        stages = {p: s for p in descendants(bench.pid) if (s := stage_of(p))}
    return stages


def _wait_for_load(bench: subprocess.Popen[bytes], stages: dict[int, str], warmup_s: float) -> dict[int, str]:
    """Wait until the load is on (the stages together busy more than half a core for a second), then
    ``warmup_s`` more; the stage processes as they are then."""
    deadline = time.monotonic() + warmup_s + 300
    while time.monotonic() < deadline and bench.poll() is None:
        stages = {p: s for p in descendants(bench.pid) if (s := stage_of(p))}
        ticks = {p: cpu_ticks(p) for p in stages}
        time.sleep(1)
        if sum(cpu_ticks(p) - ticks[p] for p in stages) / HZ > 0.5:
            break
    time.sleep(warmup_s)
    return stages


def _spy(py_spy: Path, pids: Iterable[int], seconds: float, out: Path) -> list[subprocess.Popen[bytes]]:
    """One py-spy per process, sampling for ``seconds`` into ``out/<pid>.txt``."""
    # --gil: only threads holding the GIL, i.e. Python at work (waits and native I/O are left out)
    record = [str(py_spy), "record", "--gil", "--nonblocking", "--format", "raw", "-d", str(int(seconds))]
    return [
        subprocess.Popen(
            [*record, "--pid", str(p), "--output", str(out / f"{p}.txt")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for p in pids
    ]


@dataclass(frozen=True)
class _Window:
    """What one sampling window measured."""

    scenario: str
    out: Path  # the scenario's report and the py-spy samples
    seconds: float
    used: dict[int, int]  # pid -> CPU ticks in the window
    others: dict[int, str]  # the JVMs and the bench driver, by pid
    stages: dict[int, str]


def _print_report(window: _Window, top: int) -> None:
    """Each process's share of a core over the window, and each stage's hottest code."""
    used, seconds = window.used, window.seconds
    print(f"# CPU by stage during {window.scenario} ({seconds:.0f} s window, share of one core)\n")
    print(f"the scenario's own report: {window.out}\n")
    total = sum(used.values()) / HZ / seconds
    print(f"all of the below together: {total:.2f} of the machine's {os.cpu_count()} cores\n")
    for pid, name in sorted(window.others.items(), key=lambda item: -used[item[0]]):
        print(f"- {name}: {used[pid] / HZ / seconds:.0%} of a core")
    print()
    for pid, stage in sorted(window.stages.items(), key=lambda item: -used[item[0]]):
        print(f"## {stage} (pid {pid}): {used[pid] / HZ / seconds:.0%} of a core\n")
        raw = window.out / f"{pid}.txt"
        if not raw.exists():
            print("no samples\n")
            continue
        samples, spots = hot_spots(raw)
        print(f"{samples} samples; where they fell (our innermost function -> the call it was in):")
        for label, n in spots.most_common(top):
            print(f"  {n / max(samples, 1):5.0%}  {label}")
        print()


def main() -> int:
    """Run the scenario, sample its stages over one window and print where the CPU went."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="B2", help="one bench scenario (default: B2)")
    parser.add_argument("--seconds", type=float, default=20.0, help="sampling window")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds after the load begins")
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    settings = Settings.load()  # what `aigc bench` reads too: the same infrastructure
    py_spy = Path(sys.executable).with_name("py-spy")
    out = Path(tempfile.mkdtemp(prefix="aigc-profile-"))
    aigc = Path(sys.executable).with_name("aigc")
    bench = subprocess.Popen(
        [str(aigc), "bench", "--quick", "--only", args.only, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        stages = _stages(bench)
        if not stages:
            print("the scenario's stages never appeared", file=sys.stderr)
            return 1
        stages = _wait_for_load(bench, stages, args.warmup)
        others = {**services(settings), bench.pid: "bench driver (load + collector)"}
        before = {p: cpu_ticks(p) for p in [*stages, *others]}
        spies = _spy(py_spy, stages, args.seconds, out)
        start = time.monotonic()
        time.sleep(args.seconds)
        used = {p: max(0, cpu_ticks(p) - before[p]) for p in before}
        window = _Window(args.only, out, time.monotonic() - start, used, others, stages)
        for spy in spies:
            spy.wait(60)
        bench.wait(900)  # the scenario finishes and writes its own report
    finally:
        if bench.poll() is None:
            bench.send_signal(signal.SIGINT)  # its cleanup stops the pipeline (and the infra it started)
            bench.wait(120)
    _print_report(window, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
