"""The `aigc` command: one entry point, verbs contributed by each package.

This module is the top of the layer order (tests/unit/test_layers.py): it may import every package, and
no package imports it. The supervisor starts each stage as ``python -m aigc <verb>``, a new process.

Each package's ``cli`` module has ``register(subparsers)``; verbs import their heavy modules only when
they run, so ``aigc --help`` works with nothing installed beyond the standard library and pydantic.
Settings are read once here and passed down. Exit status: 0 success, 1 failure, 2 usage.

A verb that needs services says so with ``set_defaults(needs=("kafka", ...))``: they are checked
before it runs, so one that is down fails the verb at once with one line naming it and its address.
Such a verb is a client, not a stage: librdkafka's own log lines go to the debug log (``aigc -v``).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from plumbing.errors import PipelineError
from plumbing.log_format import configure_logging
from plumbing.settings import ENV_PREFIX, Settings

Handler = Callable[[argparse.Namespace, Settings], int | None]


def env_help(text: str, env: str) -> str:
    """Help text that names the environment variable behind a flag."""
    return f"{text} (env {ENV_PREFIX}{env})"


def build_parser() -> argparse.ArgumentParser:
    """The parser of every verb: the root's own, then each package's ``register``, in a fixed order."""
    from infra import cli as infra_cli
    from producers import cli as producers_cli

    parser = argparse.ArgumentParser(
        prog="aigc",
        description="Kafka-native image and video generation: run the pipeline, submit work, operate it.",
        epilog=f"Every setting can be given in the environment with the prefix {ENV_PREFIX}; "
        "`aigc config` prints the effective settings (secrets hidden).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    config = verbs.add_parser("config", help="print the effective settings, secrets hidden")
    config.set_defaults(handler=lambda args, settings: print(settings.redacted()))
    run = verbs.add_parser(
        "run",
        help="run the pipeline's stages as processes under one supervisor (Ctrl-C stops them)",
        description="Starts the gatekeeper, the renderers of every pool and the assembler, with logs in "
        "<home>/logs (env AIGC_HOME). A crashed stage is reported and restarted.",
    )
    run.add_argument(
        "--renderers", type=int, default=1, help="renderer processes per pool (default: %(default)s)"
    )
    run.add_argument("--synthetic-ms", type=float, help="renderers use the synthetic backend (benchmarking)")
    run.add_argument("--no-restart", action="store_true", help="report a crashed stage but do not restart it")
    run.add_argument("--log-dir", type=Path, help="stage logs here (default: <home>/logs)")
    run.add_argument(
        "--state-file", type=Path, help="keep each stage's pid and readiness here as JSON (for `aigc status`)"
    )
    run.set_defaults(handler=_run)
    lag = verbs.add_parser(
        "lag-exporter",
        help="export the consumer lag of the pipeline's groups on /metrics (a stage `aigc run` starts)",
        description="Every AIGC_OBSERVABILITY__LAG_INTERVAL_S, reads each group's committed offsets and the "
        "log-end offsets and serves them on AIGC_METRICS_PORT as aigc_consumer_lag_messages and "
        "aigc_share_group_backlog_messages.",
    )
    lag.set_defaults(handler=_lag_exporter)
    for module in (infra_cli, producers_cli):
        module.register(verbs)
    for name in (
        "stream_processors.cli",
        "gpu_consumers.cli",
        "producers.ops_cli",
        "producers.top_cli",
        "producers.gateway.cli",
        "bench.cli",
    ):
        try:
            module = __import__(name, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name not in (name, name.rpartition(".")[0]):
                raise
            continue
        module.register(verbs)
    __import__("stream_processors.gatekeeper.moderation_cli", fromlist=["register"]).register(verbs)
    return parser


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from plumbing.supervisor import run_pipeline

    return run_pipeline(
        settings,
        args.renderers,
        args.synthetic_ms,
        restart=not args.no_restart,
        log_dir=args.log_dir,
        state_file=args.state_file,
    )


def _lag_exporter(args: argparse.Namespace, settings: Settings) -> int:
    from plumbing.lag_exporter import run

    run(settings)
    return 0


LIBRDKAFKA = "librdkafka"  # the logger plumbing.kafka_clients gives librdkafka


def _demote_to_debug(record: logging.LogRecord) -> bool:
    """librdkafka's lines in a client verb are debug detail: the verb reports the failure itself."""
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return logging.getLogger().isEnabledFor(logging.DEBUG)


def _client_errors() -> tuple[type[BaseException], ...]:
    """Errors a verb reports in one line: ours, the OS's, and Kafka's once a verb has loaded it."""
    errors: tuple[type[BaseException], ...] = (PipelineError, RuntimeError, OSError)
    kafka = sys.modules.get("confluent_kafka")
    return (*errors, kafka.KafkaException) if kafka is not None else errors


def main(argv: Sequence[str] | None = None) -> int:
    """Run the verb ``argv`` names (default: the command line); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = Settings.load()
    faulthandler.enable()  # a crash in a C extension (SIGSEGV, SIGABRT, ...) logs every thread's stack
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # and so does `kill -USR1 <pid>`
    configure_logging(
        logging.DEBUG if args.verbose else settings.log_level,
        settings.log_format,
        settings.instance or args.verb,
    )
    handler: Handler = args.handler
    needs = getattr(args, "needs", ())
    if needs and not args.verbose:
        logging.getLogger(LIBRDKAFKA).addFilter(_demote_to_debug)
    try:
        if needs:
            from plumbing.reachability import require

            require(settings, needs)
        return int(handler(args, settings) or 0)
    except KeyboardInterrupt:
        return 130
    except _client_errors() as exc:
        print(f"aigc {args.verb}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
