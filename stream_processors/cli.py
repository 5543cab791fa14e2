"""`aigc gatekeeper` and `aigc assemble`: the stream processors' entry points."""

from __future__ import annotations

import argparse

from plumbing.settings import Settings


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the `gatekeeper`, `assemble` and `relay` verbs (and the webhook verbs) to the ``aigc`` CLI."""
    gatekeeper = verbs.add_parser(
        "gatekeeper",
        help="run the gatekeeper (faust): validate, dedupe, moderate, rate-limit, fan out",
        description="Consumes aigc.requests.{high,normal,low}; settings under AIGC_GATEKEEPER__* "
        "(e.g. AIGC_GATEKEEPER__DEDUPE_WINDOW_S, AIGC_GATEKEEPER__TIERS, AIGC_GATEKEEPER__POLICY_PATH).",
    )
    gatekeeper.set_defaults(handler=_gatekeeper)
    assemble = verbs.add_parser(
        "assemble",
        help="run the assembler sink: frames in, stored results, Cassandra rows and completions out",
        description="Consumes aigc.frames.<class> and aigc.decisions.<class>, most urgent class first; "
        "settings under AIGC_ASSEMBLER__*.",
    )
    assemble.set_defaults(handler=_assemble)
    relay = verbs.add_parser(
        "relay",
        help="run the retry relay: hold retried work until due, then send it back to its topic",
        description="Consumes every aigc.retry.<stage>.<delay> topic; delays come from AIGC_RETRY__DELAYS_S.",
    )
    relay.set_defaults(handler=_relay)
    __import__("stream_processors.webhooks.cli", fromlist=["register"]).register(verbs)


def _gatekeeper(args: argparse.Namespace, settings: Settings) -> int:
    from stream_processors.gatekeeper.app import run

    run(settings)
    return 0


def _assemble(args: argparse.Namespace, settings: Settings) -> int:
    from stream_processors.assembler.sink import run

    run(settings)
    return 0


def _relay(args: argparse.Namespace, settings: Settings) -> int:
    from stream_processors.relay import run

    run(settings)
    return 0
