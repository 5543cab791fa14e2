"""`aigc top`: the live terminal view of a pipeline's metrics (producers/top.py)."""

from __future__ import annotations

import argparse

from plumbing.settings import Settings


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the ``top`` verb to the ``aigc`` command line."""
    top = verbs.add_parser(
        "top",
        help="live view of throughput, lag, queue wait, renderers, rejections and dead letters per class",
        description="Reads the local Prometheus (port AIGC_INFRA__PROMETHEUS_PORT) and, when it is not "
        "running, scrapes the stages listed in <AIGC_HOME>/prometheus/targets directly. Refreshes every "
        "second until Ctrl-C.",
    )
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument(
        "--pipeline", help="the pipeline's topic prefix (default: env AIGC_KAFKA__TOPIC_PREFIX, else aigc)"
    )
    top.add_argument(
        "--prometheus", metavar="URL", help="Prometheus to read (default: http://127.0.0.1:<prometheus port>)"
    )
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default: 1)")
    top.add_argument(
        "--window", type=float, default=10.0, help="seconds that rates and quantiles cover (default: 10)"
    )
    top.set_defaults(handler=_top)


def _top(args: argparse.Namespace, settings: Settings) -> int:
    from producers.top import run_top

    return run_top(
        settings,
        pipeline=args.pipeline,
        prometheus=args.prometheus,
        once=args.once,
        interval_s=args.interval,
        window_s=args.window,
    )
