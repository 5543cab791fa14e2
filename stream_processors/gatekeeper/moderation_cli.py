"""`aigc moderation eval FILE.jsonl`: score prompt moderation on a labelled file, as the gatekeeper runs it.

The Moderator is built by `build_moderator` from the same settings the gatekeeper reads
(AIGC_GATEKEEPER__POLICY_PATH, AIGC_GATEKEEPER__PROMPT_MODEL_PATH, AIGC_GATEKEEPER__MODERATION_THRESHOLDS,
AIGC_GATEKEEPER__MODERATION_CUE_THRESHOLDS, ...), so the figures are those of the running gatekeeper.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from plumbing.settings import Settings


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the `moderation` verb and its `eval` sub-verb."""
    moderation = verbs.add_parser(
        "moderation",
        help="prompt moderation tools: evaluate the gatekeeper's policy and model on labelled prompts",
    )
    actions = moderation.add_subparsers(dest="action", metavar="ACTION", required=True)
    evaluate = actions.add_parser(
        "eval",
        help="precision, recall, F1, FPR and latency of prompt moderation on a labelled JSONL file",
        description='Each line: {"id", "lang", "label": "safe"|"unsafe", "category", "evasion", '
        '"prompt"}. The moderator is built from the gatekeeper\'s settings (env AIGC_GATEKEEPER__*). '
        "The shipped test split is written by `python -m stream_processors.gatekeeper.training`.",
    )
    evaluate.add_argument("file", type=Path, help="labelled prompts, one JSON object a line")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object with a verdicts list")
    evaluate.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace, settings: Settings) -> int:
    from stream_processors.gatekeeper.evaluation import EvalFileError, evaluate, format_report, read_rows
    from stream_processors.gatekeeper.moderation import build_moderator

    try:
        rows = read_rows(args.file)
    except (OSError, EvalFileError) as exc:
        print(f"aigc moderation eval: {exc}", file=sys.stderr)
        return 2
    report = evaluate(build_moderator(settings.gatekeeper), rows)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        for line in format_report(report):
            print(line)
    return 0
