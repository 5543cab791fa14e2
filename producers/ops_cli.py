"""`aigc up | status | down`, `aigc dlq ls | show | replay` and `aigc check`: operators' verbs.

Kafka, the keyspace and the buckets come from the settings (AIGC_KAFKA__BOOTSTRAP_SERVERS,
AIGC_KAFKA__TOPIC_PREFIX, AIGC_CASSANDRA__*, AIGC_S3__*). Exit status: 0 success, 1 failure (a check
that is not ok, a replay send that failed), 2 usage.
"""

# A console verb: printing is what it is for, as in the **/cli.py modules.

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from plumbing.clock import now_ms
from plumbing.settings import Settings
from plumbing.topics import Stage

if TYPE_CHECKING:
    from producers.dlq import Filters

SERVICES = (
    "Kafka from AIGC_KAFKA__BOOTSTRAP_SERVERS and AIGC_KAFKA__TOPIC_PREFIX, Cassandra from "
    "AIGC_CASSANDRA__HOSTS/PORT/KEYSPACE, S3 from AIGC_S3__ENDPOINT_URL and AIGC_S3__*_BUCKET."
)


def parse_time(text: str) -> int:
    """Epoch milliseconds from an integer (epoch ms) or an ISO 8601 time (UTC unless it says otherwise)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither epoch milliseconds nor an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _time(text: str) -> int:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _filter_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stage", action="append", choices=[s.value for s in Stage], help="only this stage (repeatable)"
    )
    parser.add_argument(
        "--error-kind", action="append", choices=["permanent", "retryable"], help="repeatable"
    )
    parser.add_argument("--error-code", action="append", help="e.g. UNDECODABLE, UNKNOWN_MODEL (repeatable)")
    parser.add_argument("--tenant", action="append", help="only this tenant's dead letters (repeatable)")
    parser.add_argument("--request-id", action="append", help="only this request (repeatable)")
    parser.add_argument(
        "--since",
        type=_time,
        help="last failure at or after this time (ISO 8601, UTC unless it says, or epoch ms)",
    )
    parser.add_argument("--until", type=_time, help="last failure before this time (ISO 8601 or epoch ms)")
    parser.add_argument("--limit", type=int, help="at most this many dead letters, oldest first")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to read the topics (default: %(default)s)"
    )


def _verbose_flag(parser: argparse.ArgumentParser) -> None:
    # Not "verbose": `aigc -v` (debug logging) owns that name in the parsed arguments.
    parser.add_argument(
        "--verbose",
        dest="per_record",
        action="store_true",
        help="after the summary, one line per dead letter",
    )


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the operators' verbs (dlq, tenants, up, status, down, check) to the ``aigc`` command line."""
    dlq = verbs.add_parser(
        "dlq",
        help="inspect and replay dead letters",
        description="Dead letters live on <prefix>.dlq.<stage> (AIGC_KAFKA__TOPIC_PREFIX). " + SERVICES,
    )
    sub = dlq.add_subparsers(dest="dlq_verb", metavar="ACTION", required=True)
    ls = sub.add_parser("ls", help="count dead letters by stage and reason (--verbose: one line each too)")
    _filter_flags(ls)
    _verbose_flag(ls)
    ls.set_defaults(handler=_ls, needs=("kafka",))
    show = sub.add_parser(
        "show",
        help="print dead letters: error, attempts, times, original coordinates and the decoded original",
    )
    _filter_flags(show)
    show.set_defaults(handler=_show, needs=("kafka",))
    replay = sub.add_parser(
        "replay",
        help="send dead letters back to their original topics (a dry run unless --execute)",
        description="Re-validates each original against today's schemas, skips what is already finished "
        "(terminal row in Cassandra) or already replayed (its coordinate is on a message of the original "
        "topic as aigc.replayed_from), and sends the original key, value and headers, without the retry "
        "headers and with aigc.replayed_from added. " + SERVICES,
    )
    _filter_flags(replay)
    replay.add_argument("--execute", action="store_true", help="really send (default: a dry run)")
    _verbose_flag(replay)
    replay.add_argument(
        "--rate", type=float, default=50.0, help="messages per second at most (default: %(default)s)"
    )
    replay.set_defaults(handler=_replay, needs=("kafka", "cassandra"))

    tenants = verbs.add_parser(
        "tenants",
        help="provision tenants: reply topic and quotas the gatekeeper applies",
        description="Quotas live on the compacted <prefix>.tenants topic, which running gatekeepers follow "
        "(a change applies within about a second); a tenant without quotas of its own gets its tier from "
        "AIGC_GATEKEEPER__TENANT_TIERS / AIGC_GATEKEEPER__TIERS. Kafka from AIGC_KAFKA__BOOTSTRAP_SERVERS.",
    )
    tsub = tenants.add_subparsers(dest="tenants_verb", metavar="ACTION", required=True)
    add = tsub.add_parser(
        "add",
        help="create TENANT's reply topic <prefix>.reply.<tenant> and set its quotas",
        description="Quotas not given keep the tenant's current ones (or its tier's). Idempotent.",
    )
    add.add_argument("tenant")
    add.add_argument("--rate", type=float, help="requests per second")
    add.add_argument("--burst", type=float, help="requests at once after a quiet spell")
    add.add_argument(
        "--cost-rate", type=float, help="render cost (frames x steps x width x height) per second"
    )
    add.add_argument("--cost-burst", type=float, help="render cost at once")
    add.set_defaults(handler=_tenants_add, needs=("kafka",))
    tsub.add_parser("ls", help="tenants, their quotas and reply topics").set_defaults(
        handler=_tenants_ls, needs=("kafka",)
    )

    up = verbs.add_parser(
        "up",
        help="start the infrastructure and the pipeline in the background (make run)",
        description="Starts Kafka, Cassandra and S3Proxy (as `aigc infra up`), creates topics, tables and "
        "buckets, builds the tiny model if missing, then the stages under a background supervisor; returns "
        "once every stage is ready. Stage logs: <AIGC_INFRA__RUN_DIR>/pipeline/. `aigc down` stops it all.",
    )
    up.add_argument(
        "--renderers", type=int, default=1, help="renderer processes per pool (default: %(default)s)"
    )
    up.add_argument("--synthetic-ms", type=float, help="renderers use the synthetic backend (no model)")
    up.set_defaults(handler=_up)
    verbs.add_parser(
        "status",
        help="say whether each service and stage is ready; exit 1 if one is not",
    ).set_defaults(handler=_status)
    verbs.add_parser(
        "down", help="stop the pipeline's stages, then the infrastructure this run directory started"
    ).set_defaults(handler=_down)

    check = verbs.add_parser(
        "check",
        help="report lost, duplicated and orphaned requests of a run",
        description="Reads the completions and dead-letter topics, Cassandra and S3 and reports requests "
        "that were lost (neither completed nor dead-lettered), completed more than once, rows and objects "
        "without a completion, and row/completion status mismatches. Exit 0 when all is well, 1 otherwise. "
        + SERVICES,
    )
    check.add_argument("--ids-file", type=Path, help="the run's request ids, one per line")
    check.add_argument(
        "--since-s",
        type=float,
        help="look this many seconds back; without --ids-file the requests found on the request topics "
        "since then (of --tenant) are the submitted ones",
    )
    check.add_argument(
        "--tenant", action="append", help="tenant whose rows and objects to check (repeatable)"
    )
    check.add_argument(
        "--status", action="store_true", help="also read the status topic (last state of lost ids)"
    )
    check.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to read the topics (default: %(default)s)"
    )
    check.set_defaults(handler=_check, needs=("kafka", "cassandra", "s3"))


def _tenants_add(args: argparse.Namespace, settings: Settings) -> int:
    from pydantic import ValidationError

    from producers.tenants import add_tenant

    try:
        changes, tier = add_tenant(
            settings, args.tenant, args.rate, args.burst, args.cost_rate, args.cost_burst
        )
    except ValidationError as exc:
        print(f"aigc tenants add: invalid quotas: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    for change in changes:
        print(change)
    print(
        f"tenant {args.tenant}: {tier.requests_per_s:g} requests/s (burst {tier.request_burst:g}), "
        f"cost {tier.cost_per_s:g}/s (burst {tier.cost_burst:g})"
    )
    return 0


def _tenants_ls(args: argparse.Namespace, settings: Settings) -> int:
    from producers.tenants import list_tenants

    print(f"{'tenant':<20} {'req/s':>8} {'burst':>6} {'cost/s':>10} {'cost burst':>10}  quotas  reply topics")
    for t in list_tenants(settings):
        q = t.tier
        print(
            f"{t.tenant_id:<20} {q.requests_per_s:>8g} {q.request_burst:>6g} {q.cost_per_s:>10.3g} "
            f"{q.cost_burst:>10.3g}  {'own' if t.own_quotas else 'tier':<6}  "
            + (", ".join(t.reply_topics) or "-")
        )
    return 0


def _up(args: argparse.Namespace, settings: Settings) -> int:
    from producers.service import up

    return up(settings, args.renderers, args.synthetic_ms)


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from producers.service import status

    return status(settings)


def _down(args: argparse.Namespace, settings: Settings) -> int:
    from producers.service import down

    return down(settings)


def _filters(args: argparse.Namespace) -> Filters:
    from producers.dlq import Filters

    return Filters(
        stages=tuple(args.stage or ()),
        error_kinds=tuple(args.error_kind or ()),
        error_codes=tuple(args.error_code or ()),
        tenants=tuple(args.tenant or ()),
        request_ids=tuple(args.request_id or ()),
        since_ms=args.since,
        until_ms=args.until,
        limit=args.limit,
    )


def _ls(args: argparse.Namespace, settings: Settings) -> int:
    from producers.dlq import count, format_line, read_dead_letters

    entries = read_dead_letters(settings, _filters(args), timeout_s=args.timeout)
    print(count(entries).format())
    if args.per_record:
        print()
        for entry in entries:
            print(format_line(entry))
    return 0


def _show(args: argparse.Namespace, settings: Settings) -> int:
    from producers.dlq import format_entry, read_dead_letters
    from schemas.codec import default_codec

    entries = read_dead_letters(settings, _filters(args), timeout_s=args.timeout)
    for entry in entries:
        print(format_entry(entry, default_codec()), end="\n\n", flush=True)
    print(f"{len(entries)} dead letter(s)")
    return 0


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from producers.dlq import replay

    if args.rate <= 0:
        print("aigc dlq replay: --rate must be positive", file=sys.stderr)
        return 2
    report = replay(
        settings,
        _filters(args),
        execute=args.execute,
        rate=args.rate,
        timeout_s=args.timeout,
    )
    print(report.summary())
    if args.per_record:
        print()
        print("\n".join(report.lines()))
    return 1 if report.failed else 0


def _check(args: argparse.Namespace, settings: Settings) -> int:
    from producers.checker import check_delivery, submitted_since

    since = None if args.since_s is None else now_ms() - int(args.since_s * 1000)
    if args.ids_file is not None:
        lines = args.ids_file.read_text(encoding="utf-8").splitlines()
        ids = {line.strip() for line in lines if line.strip()}
    elif since is not None:
        ids = submitted_since(settings, since, args.tenant, timeout_s=args.timeout)
    else:
        print("aigc check: give --ids-file, or --since-s (with --tenant)", file=sys.stderr)
        return 2
    report = check_delivery(
        settings, ids, args.tenant, since, timeout_s=args.timeout, read_status=args.status
    )
    print(report.summary())
    return 0 if report.ok else 1
