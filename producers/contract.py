"""The generated parts of docs/producing.md: the producer's contract, rendered from the code that enforces it.

Every limit, reason code and the example producer in that page come from here, so the page cannot drift
from the code: the field table reads the GenerationRequest schema and the default `RequestLimits`; the
limits table reads the default settings; the rejection table runs `validate_request` on one broken
request per rule and prints what it raises; the decision and dead-letter tables list the reason codes
the gatekeeper and the codec spell in their source. A section sits between
``<!-- generated:NAME -->`` and ``<!-- end:NAME -->`` lines.

    python -m producers.contract            # print the generated sections
    python -m producers.contract --check    # exit 1 when docs/producing.md differs from them
    python -m producers.contract --write    # rewrite them in docs/producing.md
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from plumbing import validation
from plumbing.errors import ValidationError
from plumbing.settings import RequestLimits, Settings
from plumbing.topics import MAX_REQUEST_BYTES, Topics
from plumbing.validation import (
    FUTURE_SKEW_MS,
    ID_PATTERN,
    IMAGE_FORMATS,
    MAX_WEBHOOK_URL_CHARS,
    SCHEDULERS,
    TOPIC_PATTERN,
)
from schemas.codec import SCHEMA_DIR
from schemas.records import GenerationRequest, VideoSpec

REPO = Path(__file__).resolve().parent.parent
# The gatekeeper's source, read (never imported: stages do not import each other) for its reason codes.
ADMISSION = REPO / "stream_processors" / "gatekeeper" / "admission.py"
INFLIGHT = REPO / "stream_processors" / "gatekeeper" / "inflight.py"
DOC = REPO / "docs" / "producing.md"
EXAMPLE = REPO / "docs" / "example_producer.py"
REGENERATE = "python -m producers.contract --write"
_BLOCK = re.compile(r"(<!-- generated:(?P<name>[a-z-]+) -->\n)(?P<body>.*?)(<!-- end:(?P=name) -->)", re.S)
# Enum fields: Avro admits only their symbols, so a wrong value is undecodable, never a rejection.
_ENUM_FIELDS = frozenset({"kind", "priority"})


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    head = list(header)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _n(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,g}"


def _defaults() -> Settings:
    """The shipped defaults, whatever the environment says (the page documents a default deployment)."""
    return Settings.model_construct()


def _constant(path: Path, name: str) -> Any:
    """The literal value of a module-level ``NAME = <literal>`` in a source file."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise LookupError(f"{path}: no module-level {name}")


def _schema(record_file: str) -> dict[str, Any]:
    return dict(json.loads((SCHEMA_DIR / record_file).read_text(encoding="utf-8")))


def _type_name(avro_type: Any) -> tuple[str, bool]:
    """A short spelling of an Avro type and whether null is allowed."""
    if isinstance(avro_type, list):
        branches = [b for b in avro_type if b != "null"]
        return " | ".join(_type_name(b)[0] for b in branches), "null" in avro_type
    if isinstance(avro_type, dict):
        if avro_type["type"] == "enum":
            return "enum " + " | ".join(avro_type["symbols"]), False
        if avro_type["type"] == "map":
            return f"map<string, {avro_type['values']}>", False
        return f"record {avro_type['name']}", False
    return str(avro_type), False


def _limit_texts(settings: Settings) -> dict[str, str]:
    lim, topics = settings.limits, Topics(settings)
    text = f"at most {_n(lim.max_prompt_chars)} characters, no control characters"
    return {
        "request_id": f"`^{ID_PATTERN.pattern}$`; any other id is dead-lettered, never answered",
        "tenant_id": f"`^{ID_PATTERN.pattern}$`",
        "prompt": f"not blank, {text}",
        "negative_prompt": text,
        "model": "a name in the deployment's model registry (`AIGC_MODELS`; default `tiny-sd`)",
        "width": f"{_n(lim.min_size)} to {_n(lim.max_size)}, a multiple of {lim.size_multiple}",
        "height": f"{_n(lim.min_size)} to {_n(lim.max_size)}, a multiple of {lim.size_multiple}",
        "steps": f"1 to {_n(lim.max_steps)}",
        "guidance_scale": f"{_n(lim.min_guidance)} to {_n(lim.max_guidance)}, finite",
        "num_images": f"IMAGE: 1 to {lim.max_images}; VIDEO: 1",
        "video": "required for VIDEO, null for IMAGE",
        "video.num_frames": f"2 to {_n(lim.max_frames)}",
        "video.fps": f"{lim.min_fps} to {lim.max_fps}",
        "video.prompt_end": text,
        "output_format": f"IMAGE: {' or '.join(sorted(IMAGE_FORMATS))}; VIDEO: MP4",
        "scheduler": f"one of {', '.join(sorted(SCHEDULERS))}",
        "reply_topic": f"a topic name (`{TOPIC_PATTERN.pattern}`) equal to "
        f"`{topics.reply_prefix('<tenant>')}` (tenant lowercased) or starting with it and a dot",
        "deadline_ms": f"after created_at, at most {_n(lim.max_deadline_ms)} ms "
        f"({lim.max_deadline_ms / 86_400_000:g} days) after it",
        "labels": f"at most {lim.max_labels} entries, keys and values of at most "
        f"{lim.max_label_chars} characters",
        "created_at": f"epoch ms > 0, at most {FUTURE_SKEW_MS // 60_000} minutes ahead of the "
        "gatekeeper's clock",
        "webhook_url": f"an absolute http or https URL with a host, no user:password@, at most "
        f"{_n(MAX_WEBHOOK_URL_CHARS)} characters; the webhook stage refuses private addresses",
        "priority": "produce it to the request topic of the same class",
        "seed": "any long",
        "video.seed_end": "any long",
    }


def fields_table(settings: Settings) -> str:
    """Every GenerationRequest field (nested VideoSpec fields dotted): type, default, limit, meaning."""
    limits = _limit_texts(settings)
    rows = []

    def add(prefix: str, fields: list[dict[str, Any]]) -> None:
        for f in fields:
            name = prefix + f["name"]
            type_name, nullable = _type_name(f["type"])
            default = f"`{json.dumps(f['default'])}`" if "default" in f else "required"
            rows.append((f"`{name}`", type_name + (" or null" if nullable else ""), default,
                         limits.get(name, ""), f.get("doc", "")))  # fmt: skip
            record = next((b for b in _branches(f["type"]) if b.get("type") == "record"), None)
            if record is not None:
                add(name + ".", record["fields"])

    add("", _schema("generation_request.avsc")["fields"])
    return _table(("field", "Avro type", "default", "limit (default deployment)", "meaning"), rows)


def _branches(avro_type: Any) -> list[dict[str, Any]]:
    types = avro_type if isinstance(avro_type, list) else [avro_type]
    return [t for t in types if isinstance(t, dict)]


def limits_table(settings: Settings) -> str:
    """Per-tenant and per-deployment limits, with the setting that changes each."""
    gk, lim = settings.gatekeeper, settings.limits
    tier = gk.tiers[gk.default_tier]
    busy_ms = _constant(INFLIGHT, "BUSY_RETRY_AFTER_MS")
    caps = ", ".join(f"{c}: {_n(n)}" for c, n in gk.tenant_inflight_cap.items())
    shed = ", ".join(f"{c}: {_n(n)}" for c, n in gk.shed_backlog.items())
    retry = "`RATE_LIMITED` with `retry_after_ms`"
    rows = [
        ("requests per tenant", f"{_n(tier.requests_per_s)} per second, bursts of {_n(tier.request_burst)}",
         retry, "`AIGC_GATEKEEPER__TIERS`, `AIGC_GATEKEEPER__TENANT_TIERS`"),
        ("render cost per tenant (frames x steps x width x height)",
         f"{_n(tier.cost_per_s)} per second, bursts of {_n(tier.cost_burst)} "
         f"(one 512x512 image at 30 steps costs {_n(512 * 512 * 30)})",
         f"{retry}; a request costing more than the burst: `COST_EXCEEDS_TIER`", "`AIGC_GATEKEEPER__TIERS`"),
        ("unfinished render tasks per tenant and class", f"{caps}; other classes: no cap",
         f"`TENANT_BUSY` with `retry_after_ms` = {_n(busy_ms)}", "`AIGC_GATEKEEPER__TENANT_INFLIGHT_CAP`"),
        ("render tasks waiting in a class (all tenants)", f"{shed}; HIGH: never shed",
         "`OVERLOADED` with `retry_after_ms` from the drain rate", "`AIGC_GATEKEEPER__SHED_BACKLOG`"),
        ("dedupe window of a request_id", f"{_n(gk.dedupe_window_s)} s",
         "a repeat inside it is dropped: no answer", "`AIGC_GATEKEEPER__DEDUPE_WINDOW_S`"),
        ("video frames per render task", f"{gk.frames_per_task}", "-", "`AIGC_GATEKEEPER__FRAMES_PER_TASK`"),
        ("largest request message", f"{_n(MAX_REQUEST_BYTES)} bytes",
         "the broker refuses it: your producer gets `MSG_SIZE_TOO_LARGE`", "topic `max.message.bytes`"),
        ("request fields", f"sizes {lim.min_size}-{lim.max_size}, steps <= {lim.max_steps}, ... (above)",
         "`REJECTED` with a reason code naming the field", "`AIGC_LIMITS__*`"),
        ("presigned URL lifetime", f"{_n(settings.s3.presign_ttl_s)} s",
         "the URL stops working; `aigc get REQUEST_ID` signs a fresh one", "`AIGC_S3__PRESIGN_TTL_S`"),
    ]  # fmt: skip
    return _table(("limit", "default", "past it", "setting"), rows)


# One broken request per rule of validate_request: (what is broken, the change to a valid request).
Change = Callable[[GenerationRequest], GenerationRequest]


def _set(**fields: Any) -> Change:
    """A change that sets ``fields`` on the request (every value here fits its field's type)."""
    return lambda r: replace(r, **fields)


def _as_video(video: dict[str, Any] | None = None, **fields: Any) -> Change:
    """A change that makes the request a valid VIDEO request, then applies ``video`` and ``fields``."""

    def change(r: GenerationRequest) -> GenerationRequest:
        spec = VideoSpec(**{"num_frames": 8, "fps": 8, "prompt_end": None, **(video or {})})
        return replace(r, **{"kind": "VIDEO", "output_format": None, "video": spec, **fields})

    return change


def _rule_cases(lim: RequestLimits) -> list[tuple[str, Change]]:
    long_text = "x" * (lim.max_prompt_chars + 1)
    return [
        ("tenant_id with a space", _set(tenant_id="acme corp")),
        ("blank prompt", _set(prompt="  ")),
        ("prompt too long", _set(prompt=long_text)),
        ("control character in the prompt", _set(prompt="a cat\x07")),
        ("negative_prompt too long", _set(negative_prompt=long_text)),
        ("model not in the registry", _set(model="sd-xl-unknown")),
        ("width too large", _set(width=lim.max_size * 2)),
        ("width not a multiple", _set(width=lim.min_size + lim.size_multiple // 2)),
        ("height too small", _set(height=lim.min_size // 2)),
        ("too many steps", _set(steps=lim.max_steps + 1)),
        ("guidance_scale not finite", _set(guidance_scale=math.nan)),
        ("unknown scheduler", _set(scheduler="lms")),
        ("too many images", _set(num_images=lim.max_images + 1)),
        ("video on an IMAGE request", _set(video=VideoSpec(num_frames=8, fps=8))),
        ("MP4 for an IMAGE request", _set(output_format="MP4")),
        ("VIDEO without video", _set(kind="VIDEO", output_format=None)),
        ("too many frames", _as_video({"num_frames": lim.max_frames + 1})),
        ("fps too high", _as_video({"fps": lim.max_fps + 1})),
        ("prompt_end with a control character", _as_video({"prompt_end": "\x00"})),
        ("num_images on a VIDEO request", _as_video(num_images=2)),
        ("PNG for a VIDEO request", _as_video(output_format="PNG")),
        ("too many labels", _set(labels={f"k{i}": "v" for i in range(lim.max_labels + 1)})),
        ("created_at not epoch ms", _set(created_at=0)),
        ("created_at two hours ahead", lambda r: replace(r, created_at=r.created_at + 2 * FUTURE_SKEW_MS)),
        ("deadline_ms before created_at", lambda r: replace(r, deadline_ms=r.created_at - 1)),
        ("deadline_ms too far", lambda r: replace(r, deadline_ms=r.created_at + lim.max_deadline_ms + 1)),
        ("reply_topic not a topic name", _set(reply_topic="replies for acme")),
        ("reply_topic of another tenant", _set(reply_topic="aigc.reply.globex")),
        ("webhook_url not http(s)", _set(webhook_url="ftp://hooks.example.com/aigc")),
    ]


NOW_MS = 1_767_225_600_000  # a fixed clock (2026-01-01) keeps the generated messages stable


def valid_request() -> GenerationRequest:
    """A request every rule accepts under the default settings (the base the rule cases break)."""
    return GenerationRequest(
        request_id="r-0001", tenant_id="acme", priority="NORMAL", kind="IMAGE",
        prompt="a lighthouse at dusk", negative_prompt=None, model="tiny-sd", width=256,
        height=256, steps=20, guidance_scale=7.5, seed=None, num_images=1, video=None,
        output_format="PNG", scheduler=None, reply_topic=None, deadline_ms=None, labels={},
        created_at=NOW_MS, webhook_url=None,
    )  # fmt: skip


def rule_violations(settings: Settings) -> list[tuple[str, ValidationError]]:
    """What `validate_request` raises for each rule case, as the gatekeeper calls it."""
    topics, found = Topics(settings), []
    for what, change in _rule_cases(settings.limits):
        request = change(valid_request())
        try:
            validation.validate_request(
                request, settings.limits, settings.models.keys(), topics.reply_prefix, NOW_MS
            )
        except ValidationError as exc:
            found.append((what, exc))
        else:
            raise AssertionError(f"rule case {what!r} passed validation: fix producers/contract.py")
    return found


def validated_fields() -> set[str]:
    """Field names that plumbing/validation.py checks by name (its ValidationError and _check_* calls)."""
    tree = ast.parse(Path(validation.__file__).read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "UnknownModelError":
                names.add("model")
            elif (
                node.func.id in {"ValidationError", "_check_id", "_check_text", "_check_range"} and node.args
            ):
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    names.add(first.value)
    return names


def rejections_table(settings: Settings) -> str:
    """REJECTED Completions for invalid fields, with the message the gatekeeper sends."""
    violations = rule_violations(settings)
    covered = {exc.field for _, exc in violations}
    missing = validated_fields() - covered - _ENUM_FIELDS - {"request_id"}
    if missing:
        raise AssertionError(f"no rule case in producers/contract.py breaks {sorted(missing)}: add one")
    rows = [(f"`{exc.code}`", what, f"`{exc}`") for what, exc in violations]
    return _table(("reason_code", "example", "message (as sent)"), rows)


# What a producer should do about each gatekeeper decision, by reason code.
_DECISION_HELP = {
    "CANCELLED": ("a CancelRequest for it arrived before admission", "nothing: you asked for it"),
    "DEADLINE_EXCEEDED": ("deadline_ms passed before admission", "send a new request with a later deadline"),
    "MODERATED": ("the prompt, negative_prompt or video.prompt_end broke the content policy; `moderation` "
                  "names the field, category and policy version", "do not resend it unchanged"),
    "OVERLOADED": ("the class's render backlog is over its bound (never HIGH)",
                   "resend after retry_after_ms, with a new request_id"),
    "TENANT_BUSY": ("the tenant has its cap of unfinished render tasks in the class",
                    "resend after retry_after_ms, with a new request_id"),
    "COST_EXCEEDS_TIER": ("the request costs more render than the tenant's tier bursts to",
                          "make it smaller (fewer frames, steps or pixels); waiting never helps"),
    "RATE_LIMITED": ("the tenant's request or cost token bucket is empty",
                     "resend after retry_after_ms, with a new request_id"),
}  # fmt: skip


def _decisions() -> list[tuple[str, str, bool]]:
    """(status, reason_code, sets retry_after_ms) of every ``_decision(...)`` call in admission.py."""
    tree = ast.parse(ADMISSION.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_decision":
            status, reason = node.args[0], node.args[1]
            if isinstance(status, ast.Constant) and isinstance(reason, ast.Constant):
                retry = any(k.arg == "retry_after_ms" for k in node.keywords)
                found.append((node.lineno, str(status.value), str(reason.value), retry))
    return [d[1:] for d in sorted(found)]


def decisions_table() -> str:
    """Terminal decisions of the gatekeeper other than invalid fields, in the order it makes them."""
    rows = []
    for status, reason, retry in _decisions():
        when, todo = _DECISION_HELP.get(reason, ("(not described yet: see admission.py)", ""))
        rows.append((status, f"`{reason}`", "yes" if retry else "no", when, todo))
    return _table(("status", "reason_code", "retry_after_ms", "when", "what to do"), rows)


_DEAD_LETTER_HELP = {
    "EMPTY": "the value is empty (or null)",
    "TRUNCATED": "shorter than the 10-byte header, or the body ends inside a value",
    "BAD_MARKER": "the first two bytes are not `C3 01`",
    "UNKNOWN_SCHEMA": "the fingerprint is not one of the pipeline's schemas (or their history)",
    "WRONG_SCHEMA": "a known schema, but not GenerationRequest",
    "BAD_BODY": "the body is not valid Avro for the schema the fingerprint names",
    "TRAILING_BYTES": "bytes left over after the record",
    "BAD_ENUM_INDEX": "an enum index that is negative or past the last symbol (e.g. `priority` -1)",
    "BAD_UNION_INDEX": "a union branch index that is negative or past the last branch",
    "BAD_VARINT": "an int or long over 10 bytes, past 64 bits, or not in its shortest form",
    "INT_OUT_OF_RANGE": "an `int` field outside the 32-bit range",
    "BAD_LENGTH": "a length or block count that is negative or past the remaining bytes",
    "NON_CANONICAL": "an array or map written in more than one block (write each in one block)",
    "DUPLICATE_KEY": "a map key written twice",
    "BAD_BOOLEAN": "a boolean byte other than 0 or 1",
    "INVALID_REQUEST_ID": "decodes, but request_id breaks the id pattern: it cannot key an answer",
}


def _codes_in(path: Path, function: str | None = None) -> list[str]:
    """String values of ``code=`` keyword arguments in a module (or in one of its functions), in source
    order."""
    tree: ast.AST = ast.parse(path.read_text(encoding="utf-8"))
    if function is not None:
        tree = next(
            node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == function
        )
    codes: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for k in node.keywords:
                if k.arg == "code" and isinstance(k.value, ast.Constant):
                    codes.append((node.lineno, str(k.value.value)))
    return list(dict.fromkeys(code for _, code in sorted(codes)))


def dead_letters_table() -> str:
    """Reasons a request is dead-lettered at the gatekeeper (no Completion), from the codec and admission."""
    codes = list(
        dict.fromkeys(
            # The checks in the order a request's bytes meet them: the codec's decode, its strict pass,
            # then admission.
            _codes_in(SCHEMA_DIR / "codec.py", "decode_any")
            + _codes_in(SCHEMA_DIR / "canonical.py")
            + _codes_in(ADMISSION)
        )
    )
    rows = [(f"`{c}`", _DEAD_LETTER_HELP.get(c, "(not described yet: see the code)")) for c in codes]
    return _table(("`error_code` (and header `dlq.error.code`)", "when"), rows)


def example_block() -> str:
    """docs/example_producer.py as a fenced block."""
    return "```python\n" + EXAMPLE.read_text(encoding="utf-8") + "```\n"


def sections() -> dict[str, str]:
    """Every generated section of docs/producing.md, by name."""
    settings = _defaults()
    return {
        "fields": fields_table(settings),
        "limits": limits_table(settings),
        "rejections": rejections_table(settings),
        "decisions": decisions_table(),
        "dead-letters": dead_letters_table(),
        "example": example_block(),
    }


def render(doc: str, generated: dict[str, str]) -> str:
    """``doc`` with each generated section replaced; every section must have its markers."""
    missing = set(generated) - {m.group("name") for m in _BLOCK.finditer(doc)}
    if missing:
        raise ValueError(f"docs/producing.md lacks the markers of {sorted(missing)}")
    return _BLOCK.sub(
        lambda m: m.group(1) + generated.get(m.group("name"), m.group("body")) + m.group(4), doc
    )


def main(argv: list[str] | None = None) -> int:
    """Print, check or write the generated sections (see the module docstring); the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m producers.contract", description=__doc__.split("\n\n")[0]
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 when docs/producing.md is out of date")
    mode.add_argument("--write", action="store_true", help="rewrite the generated sections of the page")
    args = parser.parse_args(argv)
    generated = sections()
    if not (args.check or args.write):
        for name, body in generated.items():
            sys.stdout.write(f"<!-- generated:{name} -->\n{body}<!-- end:{name} -->\n\n")
        return 0
    current = DOC.read_text(encoding="utf-8")
    updated = render(current, generated)
    if args.write:
        DOC.write_text(updated, encoding="utf-8")
        return 0
    if updated != current:
        sys.stderr.write(f"{DOC.relative_to(REPO)} is out of date; regenerate it with: {REGENERATE}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
