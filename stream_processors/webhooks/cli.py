"""`aigc webhooks`: a tenant's default webhook and secret (set, show, rotate-secret) and the delivery
stage (deliver)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from plumbing.settings import Settings

if TYPE_CHECKING:
    from cassandra.cluster import Cluster

    from stream_processors.webhooks.store import WebhookStore


def register(verbs: argparse._SubParsersAction) -> None:
    """Add ``aigc webhooks`` and its actions (set, show, rotate-secret, deliver) to the CLI's verbs."""
    webhooks = verbs.add_parser(
        "webhooks",
        help="webhooks: a tenant's default URL and signing secret; the delivery stage",
        description="Completions are POSTed, signed per Standard Webhooks, to the request's webhook_url or "
        "the tenant's default URL. Settings under AIGC_WEBHOOKS__* (ALLOW_HOSTS, TIMEOUT_S, ENABLED); "
        "retries follow AIGC_RETRY__*.",
    )
    sub = webhooks.add_subparsers(dest="webhooks_verb", metavar="ACTION", required=True)
    set_ = sub.add_parser(
        "set",
        help="set a tenant's default webhook URL; creates its secret (printed once) if it has none",
    )
    set_.add_argument("tenant")
    set_.add_argument("--url", help="default URL for the tenant's completions (omit: keep it; '' clears it)")
    set_.set_defaults(handler=_set, needs=("cassandra",))
    show = sub.add_parser("show", help="a tenant's default URL and the start of its secret")
    show.add_argument("tenant")
    show.set_defaults(handler=_show, needs=("cassandra",))
    rotate = sub.add_parser(
        "rotate-secret", help="replace a tenant's secret (printed once); deliveries after it use the new one"
    )
    rotate.add_argument("tenant")
    rotate.set_defaults(handler=_rotate, needs=("cassandra",))
    deliver = sub.add_parser(
        "deliver",
        help="run the webhook delivery stage (a stage `aigc run` starts unless AIGC_WEBHOOKS__ENABLED=false)",
        description="Consumes aigc.completions and aigc.webhooks.redeliveries; retries through "
        "aigc.retry.webhooks.<delay>, dead letters on aigc.dlq.webhooks.",
    )
    deliver.set_defaults(handler=_deliver)


def _open(settings: Settings) -> tuple[Cluster, WebhookStore]:
    from plumbing.metadata import connect
    from stream_processors.webhooks.store import WebhookStore

    cluster, session = connect(settings.cassandra)
    return cluster, WebhookStore(session, settings.cassandra.keyspace)


def _tenant(tenant: str) -> str:
    from plumbing.validation import ID_PATTERN

    if not ID_PATTERN.fullmatch(tenant):
        raise SystemExit(f"aigc webhooks: tenant {tenant!r} must match ^[A-Za-z0-9_-]{{1,64}}$")
    return tenant


def _set(args: argparse.Namespace, settings: Settings) -> int:
    from plumbing.errors import ValidationError
    from plumbing.validation import check_webhook_url

    tenant = _tenant(args.tenant)
    if args.url:
        try:
            check_webhook_url(args.url, "--url")
        except ValidationError as exc:
            raise SystemExit(f"aigc webhooks set: {exc}") from None
    cluster, store = _open(settings)
    try:
        secret = store.ensure_secret(tenant)
        if args.url is not None:
            store.set_url(tenant, args.url or None)
        endpoint = store.endpoint(tenant)
    finally:
        cluster.shutdown()
    print(f"{tenant}: default URL {endpoint.url or '-'}")
    if secret:
        print(f"signing secret (shown once, keep it): {secret}")
    else:
        print(f"signing secret unchanged ({endpoint.masked_secret}); `aigc webhooks rotate-secret {tenant}`")
    return 0


def _show(args: argparse.Namespace, settings: Settings) -> int:
    cluster, store = _open(settings)
    try:
        endpoint = store.endpoint(_tenant(args.tenant))
    finally:
        cluster.shutdown()
    print(f"{endpoint.tenant_id}: default URL {endpoint.url or '-'}, secret {endpoint.masked_secret}")
    return 0 if endpoint.secret else 1


def _rotate(args: argparse.Namespace, settings: Settings) -> int:
    tenant = _tenant(args.tenant)
    cluster, store = _open(settings)
    try:
        secret = store.rotate_secret(tenant)
    finally:
        cluster.shutdown()
    print(f"{tenant}: new signing secret (shown once, keep it): {secret}")
    return 0


def _deliver(args: argparse.Namespace, settings: Settings) -> int:
    from stream_processors.webhooks.delivery import run

    run(settings)
    return 0
