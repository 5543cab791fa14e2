"""`aigc render` and `aigc models build-tiny`: the GPU consumers' entry points."""

from __future__ import annotations

import argparse
from pathlib import Path

from plumbing.settings import Settings


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the ``render`` and ``models`` verbs to the ``aigc`` command line."""
    render = verbs.add_parser(
        "render",
        help="run a renderer process of one pool (a share-group member)",
        description="Takes tasks from aigc.render.<pool>.{high,normal,low} as a member of the pool's share "
        "group (AIGC_RENDERER__CONSUMER=classic: a consumer group member instead); settings under "
        "AIGC_RENDERER__* and the model registry AIGC_MODELS.",
    )
    render.add_argument("--pool", default="default", help="renderer pool to serve (default: %(default)s)")
    render.add_argument(
        "--synthetic-ms",
        type=float,
        metavar="MS",
        help="use the synthetic benchmarking backend with this device time per frame "
        "(env AIGC_RENDERER__SYNTHETIC_MS_PER_FRAME with a model backend 'synthetic')",
    )
    render.add_argument("--synthetic-steps", type=int, help="steps the synthetic backend models")
    render.set_defaults(handler=_render)

    models = verbs.add_parser("models", help="build and inspect local models")
    sub = models.add_subparsers(dest="models_verb", metavar="ACTION", required=True)
    tiny = sub.add_parser("build-tiny", help="build the tiny random-weight SD-shaped model into DIR")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=_build_tiny)


def _render(args: argparse.Namespace, settings: Settings) -> int:
    from gpu_consumers.renderer import BackendOverrides, run

    overrides: BackendOverrides = {}
    if args.synthetic_ms is not None:
        overrides = {"kind": "synthetic", "service_ms_per_frame": args.synthetic_ms}
        if args.synthetic_steps:
            overrides["steps"] = args.synthetic_steps
    run(settings, args.pool, overrides)
    return 0


def _build_tiny(args: argparse.Namespace, settings: Settings) -> int:
    from gpu_consumers.models import build_tiny

    path = build_tiny(args.dir, seed=args.seed)
    print(f"tiny model saved to {path}")
    return 0
