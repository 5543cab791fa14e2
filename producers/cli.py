"""`aigc submit`, `aigc watch` and `aigc cancel`: the SDK from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

from plumbing.clock import now_ms
from plumbing.settings import Settings
from schemas.records import Completion, GenerationRequest, StatusEvent, VideoSpec


def register(verbs: argparse._SubParsersAction) -> None:
    """Add the SDK's verbs (submit, watch, get, demo, chaos, trace, cancel) to the ``aigc`` command line."""
    _register_submit(verbs)

    watch = verbs.add_parser("watch", help="tail completions and status events, human-readable")
    watch.add_argument("--request-id", action="append", help="only these requests (repeatable)")
    watch.add_argument("--tenant", help="only this tenant")
    watch.add_argument("--since-s", type=float, help="start this many seconds back (default: now)")
    watch.add_argument("--from-beginning", action="store_true", help="start at the beginning of the topics")
    watch.add_argument("--no-status", action="store_true", help="completions only")
    watch.add_argument("--timeout", type=float, help="stop after this many idle seconds (default: never)")
    watch.set_defaults(handler=_watch, needs=("kafka",))

    get = verbs.add_parser("get", help="print a request's state and outputs (from Cassandra)")
    get.add_argument("request_id")
    get.set_defaults(handler=_get, needs=("cassandra",))

    demo = verbs.add_parser(
        "demo",
        help="the main job: infrastructure, tiny model, pipeline, one image and one video, outputs on disk",
    )
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="where to put the outputs")
    demo.add_argument(
        "--keep",
        "--keep-running",
        dest="keep",
        action="store_true",
        help="after the results, keep the pipeline and Prometheus running for you to look at (aigc top, "
        "the Prometheus UI, aigc trace) until Ctrl-C; the infrastructure stays up afterwards",
    )
    demo.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the results")
    demo.set_defaults(handler=_demo)

    _register_chaos(verbs)

    trace = verbs.add_parser(
        "trace",
        help="print a request's timeline: each stage and render task, waits and work, retries, the end",
        description="Reads what the pipeline recorded about REQUEST_ID (its Cassandra row; its records on "
        "the request, status, frames, decisions, completions, retry and dead-letter topics, searched from a "
        "little before it was created) and prints its timeline. No tracing backend needed; for spans in "
        "one, set AIGC_OBSERVABILITY__OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_ENDPOINT) for the stages.",
    )
    trace.add_argument("request_id")
    trace.add_argument(
        "--since-s",
        type=float,
        default=3600.0,
        help="when Cassandra has no row for it yet: search this many seconds back (default: %(default)s)",
    )
    trace.add_argument("--json", action="store_true", help="print the timeline as JSON")
    trace.set_defaults(handler=_trace, needs=("kafka", "cassandra"))

    cancel = verbs.add_parser("cancel", help="cancel a request (it ends CANCELLED unless already finished)")
    cancel.add_argument("request_id")
    cancel.add_argument("--tenant", default="demo", help="owner of the request (default: %(default)s)")
    cancel.add_argument("--reason")
    cancel.set_defaults(handler=_cancel, needs=("kafka",))


def _register_chaos(verbs: argparse._SubParsersAction) -> None:
    chaos = verbs.add_parser(
        "chaos",
        help="kill stages, brokers, Cassandra and S3 and pause stages under load; report lost, duplicate, "
        "orphaned results and each fault's throughput and HIGH queue wait",
        description="Runs the pipeline (synthetic renderers) on its own topics and keyspace, submits a "
        "workload, SIGKILLs each stage and restarts the broker on a seeded schedule (and, when asked, kills "
        "the busiest partitions' leader broker, stops Cassandra and the S3 server, and pauses stages past "
        "their timeouts), then checks delivery and prints each fault window's throughput, HIGH queue wait "
        "and longest gap between completions next to the steady state, and the watchdog restarts. --full "
        "is the whole plan (make chaos); flags given with it override it. Exit 0 only when nothing was "
        "lost, duplicated or orphaned.",
    )
    chaos.add_argument("--full", action="store_true", help="every fault kind: the plan of make chaos")
    chaos.add_argument("--requests", type=int, help="requests submitted (default 200; --full 500)")
    chaos.add_argument("--duration", type=float, dest="duration_s", help="seconds of submissions and faults")
    chaos.add_argument("--kills", type=int, dest="kills_per_stage", help="SIGKILLs per stage process")
    chaos.add_argument("--broker-restarts", type=int, help="broker stops and starts (default 2; --full 0)")
    chaos.add_argument(
        "--broker-down", type=float, dest="broker_down_s", help="seconds a restart keeps it down"
    )
    chaos.add_argument(
        "--broker-kills", type=int, help="SIGKILLs of the busiest partitions' leader (--full 6)"
    )
    chaos.add_argument(
        "--broker-kill-down", type=float, dest="broker_kill_down_s", help="seconds it stays dead"
    )
    chaos.add_argument("--cassandra-outages", type=int, help="Cassandra stops (--full 2)")
    chaos.add_argument("--cassandra-down", type=float, dest="cassandra_down_s", help="seconds each lasts")
    chaos.add_argument("--s3-outages", type=int, help="S3 server stops (--full 2)")
    chaos.add_argument("--s3-down", type=float, dest="s3_down_s", help="seconds each lasts")
    chaos.add_argument("--zombies", type=int, help="stage processes paused past their timeout (--full 2)")
    chaos.add_argument(
        "--zombie-s", type=float, help="seconds a zombie is paused (default: its timeout plus 3 s)"
    )
    chaos.add_argument("--overlaps", type=int, help="faults placed inside another's window (--full 2)")
    chaos.add_argument(
        "--broker-kills-alone",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each broker kill not placed with another fault waits for the others to be over and holds "
        "them off during its window, so its figures are its own (default: on)",
    )
    chaos.add_argument("--renderers", type=int, help="renderers per pool (default 2)")
    chaos.add_argument(
        "--replicas", type=int, help="gatekeepers, assemblers and relays, each (default 1; --full 2)"
    )
    chaos.add_argument(
        "--keep",
        action="store_true",
        default=None,
        help="keep the run's topics and keyspace (for aigc trace); by default they are deleted once checked",
    )
    chaos.add_argument(
        "--kill-one-of-each",
        action="store_true",
        default=None,
        help="kill one process of each stage (drawn), not every process: with --replicas 2, its twin "
        "keeps each stage working",
    )
    chaos.add_argument(
        "--brokers",
        type=int,
        choices=(1, 3),
        help="Kafka brokers of the infrastructure it brings up (default infra.brokers; make chaos: 3)",
    )
    chaos.add_argument("--synthetic-ms", type=float, help="device time per frame (default 20)")
    chaos.add_argument("--seed", type=int, help="replay a run's fault schedule and workload")
    chaos.set_defaults(handler=_chaos)


def _register_submit(verbs: argparse._SubParsersAction) -> None:
    """Add ``aigc submit``: one flag per GenerationRequest field."""
    submit = verbs.add_parser(
        "submit",
        help="submit one generation request",
        description="Validate a GenerationRequest, produce it to aigc.requests.<priority> keyed by tenant, "
        "and print its request_id once the broker acknowledged it. Kafka comes from "
        "AIGC_KAFKA__BOOTSTRAP_SERVERS.",
    )
    submit.add_argument("prompt", help="text prompt")
    submit.add_argument("--request-id", help="idempotency key, ^[A-Za-z0-9_-]{1,64}$ (default: a new uuid)")
    submit.add_argument("--tenant", default="demo", help="tenant id (default: %(default)s)")
    submit.add_argument("--priority", choices=["high", "normal", "low"], default="normal")
    submit.add_argument("--model", help="model name from the registry (AIGC_MODELS; default: the first)")
    submit.add_argument("--negative-prompt")
    submit.add_argument("--width", type=int, default=64)
    submit.add_argument("--height", type=int, default=64)
    submit.add_argument("--steps", type=int, default=20)
    submit.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default: %(default)s)")
    submit.add_argument("--seed", type=int)
    submit.add_argument("--scheduler", choices=["ddim", "euler", "dpm", "pndm"])
    submit.add_argument("--images", type=int, default=1, help="number of images (IMAGE requests)")
    submit.add_argument("--frames", type=int, help="make a VIDEO request with this many frames")
    submit.add_argument("--fps", type=int, default=8, help="video frames per second (default: %(default)s)")
    submit.add_argument("--prompt-end", help="video: prompt of the last frame")
    submit.add_argument("--seed-end", type=int, help="video: seed of the last frame's noise")
    submit.add_argument("--format", choices=["PNG", "JPEG", "MP4"], help="output format (default by kind)")
    submit.add_argument(
        "--reply-topic", help="also send the completion here (must match the tenant's prefix)"
    )
    submit.add_argument(
        "--webhook-url",
        help="POST the completion here, signed with the tenant's webhook secret (aigc webhooks)",
    )
    submit.add_argument("--deadline-s", type=float, help="give up if not done this many seconds from now")
    submit.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    submit.add_argument("--wait", action="store_true", help="wait for the completion and print it")
    submit.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to --wait (default: %(default)s)"
    )
    submit.add_argument("--json", action="store_true", help="print the completion as JSON")
    submit.set_defaults(handler=_submit, needs=("kafka",))


def request_from_args(args: argparse.Namespace, settings: Settings) -> GenerationRequest:
    """The GenerationRequest ``aigc submit`` sends, created now (a fresh request_id unless given)."""
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"aigc submit: --label {item!r} is not KEY=VALUE")
        labels[key] = value
    video = None
    if args.frames:
        video = VideoSpec(
            num_frames=args.frames, fps=args.fps, prompt_end=args.prompt_end, seed_end=args.seed_end
        )
    created_at = now_ms()
    return GenerationRequest(
        request_id=args.request_id or uuid.uuid4().hex,
        tenant_id=args.tenant,
        priority=args.priority.upper(),
        kind="VIDEO" if video else "IMAGE",
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        model=args.model or next(iter(settings.models), ""),
        width=args.width,
        height=args.height,
        steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        num_images=args.images,
        video=video,
        output_format=args.format,
        scheduler=args.scheduler,
        reply_topic=args.reply_topic,
        deadline_ms=None if args.deadline_s is None else created_at + int(args.deadline_s * 1000),
        labels=labels,
        created_at=created_at,
        webhook_url=args.webhook_url,
    )


def _submit(args: argparse.Namespace, settings: Settings) -> int:
    from plumbing.errors import ValidationError
    from producers.client import Client

    with Client(settings) as client:
        try:
            request_id = client.submit(request_from_args(args, settings))
        except ValidationError as exc:
            print(f"aigc submit: invalid request: {exc} [{exc.code}]", file=sys.stderr)
            return 2
        print(request_id, flush=True)
        if not args.wait:
            return 0
        completion = client.wait(request_id, timeout_s=args.timeout)
    print(json.dumps(completion.to_avro(), indent=2) if args.json else format_completion(completion))
    return 0 if completion.status == "SUCCEEDED" else 1


def format_completion(c: Completion) -> str:
    """A completion for a person: status and reason, timings when it succeeded, one line per output."""
    t = c.timings
    lines = [f"{c.request_id}  {c.status}" + (f"  {c.reason_code}: {c.message}" if c.reason_code else "")]
    if c.retry_after_ms:
        lines.append(f"  retry after {c.retry_after_ms} ms")
    if c.status == "SUCCEEDED":
        lines.append(
            f"  total {t.total_ms} ms (queued {t.queued_ms}, render {t.render_ms}, assemble {t.assemble_ms})"
        )
    for out in c.outputs:
        extra = f", {out.frames} frames @ {out.fps} fps" if out.frames else ""
        lines.append(f"  {out.kind.lower()} {out.width}x{out.height}{extra}, {out.bytes} bytes: {out.uri}")
    return "\n".join(lines)


def format_event(record: Completion | StatusEvent, timestamp_ms: int) -> str:
    """One line of ``aigc watch``: when, whose, and the completion or the state (with progress)."""
    clock = time.strftime("%H:%M:%S", time.localtime(timestamp_ms / 1000)) + f".{timestamp_ms % 1000:03d}"
    head = f"{clock}  {record.request_id:<34} {record.tenant_id:<12}"
    if isinstance(record, Completion):
        return f"{head} {format_completion(record)}"
    progress = record.progress
    bar = f" {progress.done}/{progress.total}" if progress else ""
    who = f" ({record.stage}{' ' + record.worker_id if record.worker_id else ''})"
    return f"{head} {record.state}{bar}{who}"


def _watch(args: argparse.Namespace, settings: Settings) -> int:
    from producers.client import Client

    since = now_ms() - int(args.since_s * 1000) if args.since_s is not None else None
    with Client(settings, known_models=None) as client:
        for event in client.subscribe(
            request_ids=args.request_id,
            tenant_id=args.tenant,
            status=not args.no_status,
            since_ms=since,
            from_beginning=args.from_beginning,
            timeout_s=args.timeout,
        ):
            print(format_event(event.record, event.timestamp_ms), flush=True)
    return 0


def _cancel(args: argparse.Namespace, settings: Settings) -> int:
    from producers.client import Client

    with Client(settings, known_models=None) as client:
        client.cancel(args.request_id, args.tenant, args.reason)
    print(f"cancellation of {args.request_id} sent")
    return 0


def _get(args: argparse.Namespace, settings: Settings) -> int:
    from producers.lookup import describe, lookup

    state = lookup(settings, args.request_id)
    print(describe(state))
    return 0 if state.row is not None else 1


def _trace(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console

    from producers.request_log import read_request
    from producers.timeline import build, render

    found = read_request(settings, args.request_id, now_ms() - int(args.since_s * 1000))
    timeline = build(args.request_id, found.seen, found.row)
    if args.json:
        print(json.dumps(timeline.to_json(), indent=2))
    else:
        render(timeline, Console(width=None if sys.stdout.isatty() else 160))
    return 0 if timeline.steps else 1


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from producers.demo import run_demo

    return run_demo(settings, args.out, keep=args.keep, timeout_s=args.timeout)


def _chaos(args: argparse.Namespace, settings: Settings) -> int:
    from producers.chaos import plan_from_args, run_chaos

    settings = settings.for_brokers(args.brokers)
    report = run_chaos(settings, plan_from_args(args))
    print(report.summary())
    return 0 if report.ok else 1
