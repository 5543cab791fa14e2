"""`aigc bench`: run the benchmark suite against local infrastructure and write its report."""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path

from plumbing.settings import Settings


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the ``bench`` verb to the ``aigc`` command line."""
    bench = verbs.add_parser(
        "bench",
        help="run the benchmark suite (T1, B1-B7; LEDGER: cost per request; PEER: B1-B3 on Celery + Redis; "
        "GW: the HTTP gateway) and write a report",
        description="Starts the local infrastructure if needed and one pipeline per scenario, on topics and "
        "keyspaces of its own. Figures are measurements, never pass/fail.",
    )
    bench.add_argument("--only", help="comma-separated scenarios, e.g. T1,B3 (default: all)")
    bench.add_argument("--quick", action="store_true", help="fewer requests and shorter runs")
    bench.add_argument("--out", type=Path, default=Path("bench/results"), help="where reports go")
    bench.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace, settings: Settings) -> int:
    from bench.report import write
    from bench.scenarios import SCENARIOS
    from infra.bootstrap import bootstrap
    from infra.launcher import down, status, up
    from producers.demo import ensure_models

    chosen = [s.strip().upper() for s in args.only.split(",")] if args.only else list(SCENARIOS)
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        known = ", ".join(SCENARIOS)
        print(f"aigc bench: unknown scenario(s) {', '.join(sorted(unknown))}; choose from {known}")
        return 2
    was_running = all(s.ready for s in status(settings))
    up(settings, echo=lambda _: None)
    bootstrap(settings, echo=lambda _: None)
    ensure_models(settings)
    results: dict[str, object] = {}
    started = time.monotonic()
    try:
        for name in chosen:
            print(f"== {name}: {SCENARIOS[name].__doc__.splitlines()[0]}", flush=True)  # type: ignore[union-attr]
            began = time.monotonic()
            try:
                results[name] = SCENARIOS[name](settings, args.quick)
            except Exception as exc:  # noqa: BLE001 - one broken scenario must not lose the others' figures
                traceback.print_exc()
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"   {time.monotonic() - began:.0f} s", flush=True)
        results["wall_s"] = round(time.monotonic() - started)
    finally:
        if not was_running:
            down(settings, echo=lambda _: None)
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    json_path, md_path = write(out, results, settings)
    print(md_path.read_text())
    print(f"written: {json_path} and {md_path}")
    return 0
