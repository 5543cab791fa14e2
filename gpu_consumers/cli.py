"""`aigc render` and `aigc models ...` (build the tiny model; train, install and evaluate the shapes
model): the GPU consumers' entry points."""

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

    train = sub.add_parser(
        "train-shapes",
        help="train the demo's shapes text-to-image model on procedural scenes (CPU, about 30 minutes)",
        description="Draws scenes of coloured shapes with English and Chinese captions and trains a small "
        "VAE, CLIP text encoder and UNet on them from random weights, with fixed seeds and step counts, into "
        "a "
        "StableDiffusionPipeline folder. Default DIR: the weights shipped in the repository.",
    )
    train.add_argument(
        "dir", type=Path, nargs="?", help="where to write the model (default: the shipped folder)"
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--vae-steps", type=int, help="VAE training steps (default 1500)")
    train.add_argument("--unet-steps", type=int, help="UNet and text encoder training steps (default 2400)")
    train.add_argument(
        "--max-minutes",
        type=float,
        help="stop training early past this wall time (default: no limit; the step counts fix the result)",
    )
    train.set_defaults(handler=_train_shapes)

    install = sub.add_parser(
        "install-shapes",
        help="put the shapes model into DIR: a copy of the shipped weights, trained first if they are "
        "missing",
    )
    install.add_argument("dir", type=Path)
    install.set_defaults(handler=_install_shapes)

    evaluate = sub.add_parser(
        "eval-shapes",
        help="prompt agreement of the shapes model on captions of attribute combinations it never saw",
        description="Renders N held-out captions (half English, half Chinese) through the renderer's "
        "diffusers backend and scores each picture with the OpenCV colour-and-shape checker.",
    )
    evaluate.add_argument("dir", type=Path, nargs="?", help="model folder (default: the shipped folder)")
    evaluate.add_argument("--prompts", type=int, default=200, help="how many prompts (default: %(default)s)")
    evaluate.add_argument("--sheet", type=Path, help="also write the pictures as a contact sheet (PNG)")
    evaluate.set_defaults(handler=_eval_shapes)


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


def _train_shapes(args: argparse.Namespace, settings: Settings) -> int:
    import dataclasses

    from gpu_consumers.shapes.training import SHIPPED, TrainConfig, train

    overrides = {
        "seed": args.seed,
        "vae_steps": args.vae_steps,
        "unet_steps": args.unet_steps,
        "max_minutes": args.max_minutes,
    }
    config = dataclasses.replace(TrainConfig(), **{k: v for k, v in overrides.items() if v is not None})
    train(args.dir or SHIPPED, config, say=lambda line: print(line, flush=True))
    return 0


def _install_shapes(args: argparse.Namespace, settings: Settings) -> int:
    from gpu_consumers.shapes.training import install

    print(f"shapes model in {install(args.dir, say=lambda line: print(line, flush=True))}")
    return 0


def _eval_shapes(args: argparse.Namespace, settings: Settings) -> int:
    from gpu_consumers.shapes.evaluation import evaluate
    from gpu_consumers.shapes.training import SHIPPED

    report = evaluate(args.dir or SHIPPED, n=args.prompts, sheet=args.sheet)
    print("\n".join(report.lines()))
    return 0
