"""`aigc infra up | down | status | bootstrap` and `aigc kafka <tool> ...`."""

from __future__ import annotations

import argparse

from plumbing.settings import Settings


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the ``infra`` verb (up, down, status, bootstrap) and the ``kafka`` tool verbs."""
    infra = verbs.add_parser(
        "infra",
        help="run the local Kafka, Cassandra, S3Proxy and Prometheus",
        description="Local services from the jars in infra/lib (make setup resolves them). Ports come from "
        "AIGC_KAFKA__BOOTSTRAP_SERVERS, AIGC_CASSANDRA__PORT, AIGC_S3__ENDPOINT_URL and "
        "AIGC_INFRA__PROMETHEUS_PORT; data and logs live under AIGC_INFRA__RUN_DIR. Prometheus (Debian's "
        "package, which make setup installs) scrapes the stages listed in <AIGC_HOME>/prometheus/targets.",
    )
    sub = infra.add_subparsers(dest="infra_verb", metavar="ACTION", required=True)
    up = sub.add_parser("up", help="start what is not running, wait until ready, bootstrap")
    up.add_argument("--no-bootstrap", action="store_true", help="skip creating topics, tables and buckets")
    up.add_argument(
        "--brokers",
        type=int,
        choices=(1, 3),
        help="Kafka brokers: 3 runs the KRaft cluster kafka-1..kafka-3 (topics with replication factor 3, "
        "min.insync.replicas 2); default AIGC_INFRA__BROKERS (1). Export AIGC_INFRA__BROKERS=3 for the "
        "other commands and the stages, so that they list all three brokers",
    )
    up.set_defaults(handler=_up)
    sub.add_parser("down", help="stop the services this run directory started").set_defaults(handler=_down)
    sub.add_parser("status", help="say what each service is doing; exit 1 if one is not ready").set_defaults(
        handler=_status
    )
    sub.add_parser("bootstrap", help="create missing topics, tables and buckets").set_defaults(
        handler=_bootstrap
    )
    register_kafka(verbs)


def register_kafka(verbs: argparse._SubParsersAction) -> None:
    """Add the ``kafka`` verb: Kafka's own command-line tools, run from the jars against our broker."""
    from infra.kafka_tools import TOOLS

    kafka = verbs.add_parser(
        "kafka",
        help="Kafka's own admin tools (consumer groups, topics, ...) against the configured cluster",
        description="Runs Kafka's command-line tools from infra/lib/kafka with --bootstrap-server from "
        "AIGC_KAFKA__BOOTSTRAP_SERVERS; every other argument goes to the tool unchanged, e.g. "
        "`aigc kafka groups --list`, `aigc kafka groups --describe --group aigc-gatekeeper`, "
        "`aigc kafka topics --describe --topic aigc.requests.normal`.",
    )
    sub = kafka.add_subparsers(dest="kafka_tool", metavar="TOOL", required=True)
    for tool, main_class in TOOLS.items():
        # No option of our own ("+" prefix): every argument, --help included, is the tool's.
        parser = sub.add_parser(tool, help=main_class, add_help=False, prefix_chars="+")
        parser.add_argument("args", nargs="*", help="passed to the tool (--help: its help)")
        parser.set_defaults(handler=_kafka_tool, needs=("kafka",))


def _kafka_tool(args: argparse.Namespace, settings: Settings) -> int:
    from infra.kafka_tools import run_tool

    return run_tool(settings, args.kafka_tool, args.args)


def _up(args: argparse.Namespace, settings: Settings) -> int:
    from infra.bootstrap import bootstrap
    from infra.launcher import up

    settings = settings.for_brokers(args.brokers)
    up(settings)
    if settings.infra.brokers > 1:
        print(
            f"kafka: {settings.infra.brokers} brokers at {settings.kafka.bootstrap_servers}; "
            f"export AIGC_INFRA__BROKERS={settings.infra.brokers} for the other commands and the stages"
        )
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
