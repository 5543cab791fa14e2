"""`aigc gateway` (the HTTP gateway stage) and `aigc keys create|ls|revoke` (its API keys)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from plumbing.settings import Settings


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the ``gateway`` and ``keys`` verbs to the ``aigc`` command line."""
    gateway = verbs.add_parser(
        "gateway",
        help="serve the HTTP API and the web console (a stage `aigc run` starts)",
        description="POST/GET /v1/generations, Server-Sent Events, cancel and history for API-key tenants, "
        "OpenAPI at /docs and the console at /console/, on AIGC_GATEWAY__HOST:AIGC_GATEWAY__PORT "
        "(default 127.0.0.1:19080); /metrics, /healthz and /readyz on AIGC_METRICS_PORT.",
    )
    gateway.set_defaults(handler=_gateway)

    keys = verbs.add_parser("keys", help="create, list and revoke the gateway's API keys (stored hashed)")
    sub = keys.add_subparsers(dest="keys_verb", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="a new key for a tenant, printed once")
    create.add_argument("tenant", help="tenant id, ^[A-Za-z0-9_-]{1,64}$")
    create.add_argument("--label", default="", help="a note to tell keys apart")
    create.add_argument("--operator", action="store_true", help="may also read the operator page (/v1/ops)")
    create.add_argument("--json", action="store_true", help="print the key and its id as JSON")
    create.set_defaults(handler=_create, needs=("cassandra",))
    ls = sub.add_parser("ls", help="list keys (never the keys themselves)")
    ls.add_argument("--tenant", help="only this tenant's keys")
    ls.set_defaults(handler=_ls, needs=("cassandra",))
    revoke = sub.add_parser("revoke", help="revoke a key by its id (it stops working within seconds)")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=_revoke, needs=("cassandra",))


def _gateway(args: argparse.Namespace, settings: Settings) -> int:
    from producers.gateway.server import run

    run(settings)
    return 0


def _store(settings: Settings) -> tuple[Any, Any]:
    from plumbing.metadata import connect
    from producers.gateway.keys import KeyStore

    cluster, session = connect(settings.cassandra)
    return cluster, KeyStore(session, settings.cassandra.keyspace)


def _create(args: argparse.Namespace, settings: Settings) -> int:
    cluster, store = _store(settings)
    try:
        record, key = store.create(args.tenant, args.label, args.operator)
    except ValueError as exc:
        print(f"aigc keys create: {exc}")
        return 2
    finally:
        cluster.shutdown()
    if args.json:
        print(json.dumps({"key": key, "key_id": record.key_id, "tenant_id": record.tenant_id}))
    else:
        print(f"key {record.key_id} for tenant {record.tenant_id} (shown once; only its hash is stored):")
        print(key)
    return 0


def _ls(args: argparse.Namespace, settings: Settings) -> int:
    cluster, store = _store(settings)
    try:
        keys = store.list(args.tenant)
    finally:
        cluster.shutdown()
    for k in keys:
        state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active"
        created = f"{k.created_at:%Y-%m-%d %H:%M}" if k.created_at else "?"
        role = " operator" if k.operator else ""
        print(f"{k.key_id}  {k.tenant_id:<20} {state:<24} created {created}{role}  {k.label}")
    if not keys:
        print("no keys")
    return 0


def _revoke(args: argparse.Namespace, settings: Settings) -> int:
    cluster, store = _store(settings)
    try:
        found = store.revoke(args.key_id)
    finally:
        cluster.shutdown()
    print(f"key {args.key_id}: {'revoked' if found else 'no such key'}")
    return 0 if found else 1
