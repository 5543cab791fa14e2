"""`aigc infra up | down | status | bootstrap`."""

from __future__ import annotations

import argparse

from plumbing.settings import Settings


def register(verbs: argparse._SubParsersAction) -> None:
    infra = verbs.add_parser(
        "infra",
        help="run the local Kafka, Cassandra and S3Proxy",
        description="Local services from the jars in infra/lib (make setup resolves them). Ports come from "
        "AIGC_KAFKA__BOOTSTRAP_SERVERS, AIGC_CASSANDRA__PORT and AIGC_S3__ENDPOINT_URL; data and logs live "
        "under AIGC_INFRA__RUN_DIR.",
    )
    sub = infra.add_subparsers(dest="infra_verb", metavar="ACTION", required=True)
    up = sub.add_parser("up", help="start what is not running, wait until ready, bootstrap")
    up.add_argument("--no-bootstrap", action="store_true", help="skip creating topics, tables and buckets")
    up.set_defaults(handler=_up)
    sub.add_parser("down", help="stop the services this run directory started").set_defaults(handler=_down)
    sub.add_parser("status", help="say what each service is doing; exit 1 if one is not ready").set_defaults(
        handler=_status
    )
    sub.add_parser("bootstrap", help="create missing topics, tables and buckets").set_defaults(
        handler=_bootstrap
    )


def _up(args: argparse.Namespace, settings: Settings) -> int:
    from infra.bootstrap import bootstrap
    from infra.launcher import up

    up(settings)
    if not args.no_bootstrap:
        bootstrap(settings)
    return 0


def _down(args: argparse.Namespace, settings: Settings) -> int:
    from infra.launcher import down

    down(settings)
    return 0


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from infra.launcher import rss_mb, status

    states = status(settings)
    rss = rss_mb(settings)
    for s in states:
        state = "ready" if s.ready else ("running" if s.running else "down")
        mem = f", {rss[s.name]:.0f} MiB" if s.name in rss else ""
        pid = f"pid {s.pid}, " if s.pid else ""
        print(f"{s.name:<10} {state:<8} ({pid}port {s.ports[0]}{mem})")
        if s.note and s.note != "stopped":
            print(f"  {s.note}")
    return 0 if all(s.ready for s in states) else 1


def _bootstrap(args: argparse.Namespace, settings: Settings) -> int:
    from infra.bootstrap import bootstrap

    bootstrap(settings)
    return 0
