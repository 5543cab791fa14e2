"""The poison corpus: malformed and hostile request events, each with what the pipeline must do with it.

`poison_corpus(settings, n, seed)` returns at least ``n`` events spread over the kinds in `GENERATORS`,
shuffled so the kinds interleave. Each kind is a generator that is deterministic given the seed (and the
clock reading ``now_ms`` that timestamps are made from). What an event must come to is not guessed: it
is computed from the bytes with the current codec and validator (`judge`):

- ``dead_letter``: the bytes do not decode as a GenerationRequest, so the gatekeeper must put them on
  its dead-letter topic untouched; ``reason_code`` is the DecodeError code the dead letter must carry
  (``bad_enum_index`` and ``bad_union_index`` must carry BAD_ENUM_INDEX / BAD_UNION_INDEX: see
  `tests/unit/test_codec_strict.py` for why fastavro alone would accept them).
- ``rejected``: the bytes decode, so the request must end with exactly one Completion, ``status``
  REJECTED (``reason_code`` from the validator) or EXPIRED (a deadline already past).

Decodable events carry request ids that start with ``poison-`` and are unique in the corpus, also when
the kind is about broken ids ("../poison-bad-ids-00012", "poison-bad-ids-00013\\x00"). Undecodable
events keep ``source_request_id``, the id of the request their bytes were made from, so a test can
check that nothing was ever recorded or answered under it.
"""

from __future__ import annotations

import io
import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import fastavro

from plumbing.clock import now_ms as clock_ms
from plumbing.errors import DecodeError, ValidationError
from plumbing.headers import pipeline_headers
from plumbing.settings import Settings
from plumbing.topics import PRIORITIES, Topics
from plumbing.validation import ID_PATTERN, validate_request
from schemas.codec import HEADER_LEN, MARKER, Codec, default_codec
from schemas.records import GenerationRequest, VideoSpec

MiB = 1024 * 1024
MAX_MESSAGE = 7 * MiB  # the largest value in the corpus stays below this
HOUR_MS = 3600 * 1000
Header = tuple[str, bytes | None]


@dataclass(frozen=True)
class PoisonEvent:
    kind: str
    topic: str  # a request topic
    key: bytes | None
    value: bytes
    headers: list[Header]
    request_id: str | None  # None when the value does not decode
    tenant_id: str | None
    expect: str  # "dead_letter" or "rejected"
    status: str | None = None  # "rejected": REJECTED or EXPIRED
    reason_code: str | None = None  # the Completion's reason_code, or the dead letter's error_code
    source_request_id: str | None = None  # undecodable: the id inside the bytes it was made from
    note: str = ""  # what was done to it, for failure messages

    def describe(self) -> str:
        rid = self.request_id if self.request_id is None else self.request_id[:80]
        return f"{self.kind}[{self.note}] {len(self.value)} B, request_id={rid!r}, expect={self.expect}"


@dataclass
class _Context:
    settings: Settings
    codec: Codec
    topics: Topics
    rng: random.Random
    now_ms: int
    kind: str = ""
    index: int = 0  # events of this kind made so far
    serial: int = 0  # ids of this kind handed out so far
    tenants: tuple[str, ...] = field(default=("poison-tenant-a", "poison-tenant-b", "poison-tenant-c"))

    def rid(self, suffix: str = "") -> str:
        """A fresh ``poison-<kind>-<n>`` id (valid, unique in the corpus)."""
        self.serial += 1
        return f"poison-{self.kind.replace('_', '-')}-{self.serial:05d}{suffix}"

    def tenant(self) -> str:
        return self.rng.choice(self.tenants)

    def words(self, size: int) -> str:
        """``size`` characters of random lower-case letters and spaces: text that does not compress."""
        alphabet = string.ascii_lowercase + " "
        return "".join(self.rng.choices(alphabet, k=size))

    def request(self, **fields: Any) -> GenerationRequest:
        """A valid GenerationRequest (64x64, 2 steps), then ``fields`` on top (values of the field's type
        that break the rules: the corpus's broken bytes are made from the encoding afterwards)."""
        created_at = self.now_ms - self.rng.randrange(1, 60_000)
        record = GenerationRequest(
            request_id=self.rid(),
            tenant_id=self.tenant(),
            priority=self.rng.choice(PRIORITIES).value,
            kind="IMAGE",
            prompt=f"a poison test {self.words(12)}",
            negative_prompt=None,
            model=next(iter(self.settings.models)),
            width=64,
            height=64,
            steps=2,
            guidance_scale=7.5,
            seed=None,
            num_images=1,
            video=None,
            output_format=None,
            scheduler=None,
            reply_topic=None,
            deadline_ms=None,
            labels={"suite": "poison"},
            created_at=created_at,
        )
        return replace(record, **fields)

    def encode(self, record: GenerationRequest) -> bytes:
        return self.codec.write(record)


Made = tuple[bytes, str] | tuple[bytes, str, str | None]  # value, note[, source request id]


def _varint(value: int) -> bytes:
    """Avro's zig-zag varint of a long (a length prefix, a block count)."""
    n = ((value << 1) ^ (value >> 63)) & (2**64 - 1)
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _string_at(data: bytes, text: str) -> tuple[int, int]:
    """(start of the length prefix, start of the bytes) of the Avro string ``text`` inside ``data``."""
    raw = text.encode()
    prefix = _varint(len(raw))
    at = data.index(prefix + raw, HEADER_LEN)
    return at, at + len(prefix)


# -- undecodable kinds ------------------------------------------------------------------------------


def truncated(ctx: _Context) -> Made:
    record = ctx.request()
    data = ctx.encode(record)
    cut = ctx.rng.choice(
        [ctx.rng.randrange(HEADER_LEN, len(data)), ctx.rng.randrange(1, HEADER_LEN), len(data) - 1]
    )
    return data[:cut], f"cut to {cut} of {len(data)}", record.request_id


def wrong_marker(ctx: _Context) -> Made:
    record = ctx.request()
    data = ctx.encode(record)
    choice = ctx.rng.randrange(5)
    if choice == 0:  # what a JSON producer would send
        return json.dumps(record.to_avro()).encode(), "JSON", record.request_id
    if choice == 1:  # a Confluent Schema Registry framed message (magic 0, schema id)
        return b"\x00\x00\x00\x00\x2a" + data[HEADER_LEN:], "schema registry frame", record.request_id
    marker = ctx.rng.choice([b"\xc3\x00", b"\xc3\x02", b"\x01\xc3", b"\x00\x00", b"\xff\xff"])
    return marker + data[2:], f"marker {marker.hex()}", record.request_id


def unknown_fingerprint(ctx: _Context) -> Made:
    record = ctx.request()
    data = ctx.encode(record)
    known = {ctx.codec.schema(r).fingerprint for r in ctx.codec.records}
    while (fp := ctx.rng.randbytes(8)) in known:
        pass
    if ctx.rng.random() < 0.3:  # one bit off the real fingerprint
        real = bytearray(data[2:HEADER_LEN])
        real[ctx.rng.randrange(8)] ^= 1 << ctx.rng.randrange(8)
        fp = bytes(real)
    return MARKER + fp + data[HEADER_LEN:], f"fingerprint {fp.hex()}", record.request_id


def _minimal(schema: Any, names: dict[str, Any], fill: dict[str, Any]) -> Any:
    """The smallest datum of ``schema`` (first union branch, empty collections), ``fill`` by field name."""
    if isinstance(schema, str):
        simple = {"null": None, "boolean": False, "int": 0, "long": 0, "float": 0.0, "double": 0.0,
                  "bytes": b"", "string": ""}  # fmt: skip
        return simple[schema] if schema in simple else _minimal(names[schema.rsplit(".", 1)[-1]], names, {})
    if isinstance(schema, list):
        return _minimal(schema[0], names, fill)
    kind = schema["type"]
    if kind in ("array", "map"):
        return [] if kind == "array" else {}
    if kind == "enum":
        names[schema["name"]] = schema
        return schema["symbols"][0]
    if kind == "fixed":
        names[schema["name"]] = schema
        return b"\x00" * schema["size"]
    if kind == "record":
        names[schema["name"]] = schema
        return {
            f["name"]: fill[f["name"]] if f["name"] in fill else _minimal(f["type"], names, {})
            for f in schema["fields"]
        }
    return _minimal(kind, names, fill)


def wrong_schema(ctx: _Context) -> Made:
    """A well-formed record of another schema (CancelRequest, Completion, RenderTask...): wrong topic."""
    name = ctx.rng.choice([r for r in ctx.codec.records if r != "GenerationRequest"])
    schema = json.loads(ctx.codec.schema(name).source.read_text(encoding="utf-8"))
    request_id = ctx.rid()
    datum = _minimal(schema, {}, {"request_id": request_id, "tenant_id": ctx.tenant(), "task_id": request_id})
    # A dict, not a record class: the datum is made from whichever schema was drawn, field by field.
    return ctx.codec.encode(name, datum), name, request_id


# Invalid UTF-8 of a fixed length: a lone byte, a lone continuation byte, an overlong "/", a UTF-16
# surrogate, a code point above U+10FFFF.
BAD_UTF8 = [b"\xff", b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]


def bad_utf8(ctx: _Context) -> Made:
    """Invalid UTF-8 inside a string field, its length prefix still right."""
    record = ctx.request(prompt=f"an utf8 target {ctx.words(20)}")
    field_name = ctx.rng.choice(["prompt", "request_id", "tenant_id", "model", "labels"])
    if field_name == "labels":
        record.labels = {"utf8-target-key": "v"}
        text = "utf8-target-key"
    else:
        text = {"prompt": record.prompt, "request_id": record.request_id, "tenant_id": record.tenant_id,
                "model": record.model}[field_name]  # fmt: skip
    data = ctx.encode(record)
    _, start = _string_at(data, text)
    bad = ctx.rng.choice(BAD_UTF8)
    at = start + ctx.rng.randrange(len(text.encode()) - len(bad) + 1)
    value = data[:at] + bad + data[at + len(bad) :]
    return value, f"{bad.hex()} in {field_name}", record.request_id


def huge_string(ctx: _Context) -> Made:
    """A string length prefix claiming far more (or less) than is there; once, a genuinely huge prompt."""
    if ctx.index == 0:  # first of its kind: a valid 6 MB prompt (decodes; rejected for its length)
        return ctx.encode(ctx.request(prompt=ctx.words(6_000_000))), "6 MB prompt"
    record = ctx.request()
    data = ctx.encode(record)
    prefix_at, start = _string_at(data, record.prompt)
    claim = ctx.rng.choice([2**31 - 1, 2**40, 2**62, len(record.prompt) + 1000, -1, -(2**62)])
    value = data[:prefix_at] + _varint(claim) + data[start:]
    return value, f"prompt length {claim}", record.request_id


def huge_array(ctx: _Context) -> Made:
    """The labels map's block count absurdly large (or negative with a bogus byte size)."""
    record = ctx.request(labels={})
    data = ctx.encode(record)
    at = _field_at(ctx, record, "labels")
    assert data[at] == 0, "an empty map is a single zero byte (its end-of-blocks count)"
    count = ctx.rng.choice([2**62, 2**31 - 1, 10**9, -(2**62), -(10**9), 2**63 - 1])
    tail = ctx.rng.choice([b"", _varint(2) + b"kk" + _varint(2) + b"vv", _varint(2**40)])
    value = data[:at] + _varint(count) + tail + data[at + 1 :]
    return value, f"labels block count {count}", record.request_id


def _field_at(ctx: _Context, record: GenerationRequest, field: str) -> int:
    """Where ``field`` starts in ``ctx.encode(record)``: the encoded length of the fields before it."""
    schema = ctx.codec.schema("GenerationRequest").parsed
    names = [f["name"] for f in schema["fields"]]
    before = {"type": "record", "name": "Before", "fields": schema["fields"][: names.index(field)]}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(before), record.to_avro())
    return HEADER_LEN + len(buf.getvalue())


def bad_enum_index(ctx: _Context) -> Made:
    """An enum index that fastavro alone reads as a real symbol (negative: Python's indexing wraps) or
    cannot read (past the last symbol)."""
    field_name = ctx.rng.choice(["priority", "priority", "kind", "output_format"])
    record = ctx.request(output_format="PNG")
    data = ctx.encode(record)
    at = _field_at(ctx, record, field_name) + (1 if field_name == "output_format" else 0)  # past its union
    index = ctx.rng.choice([-1, -2, -3, -1, 3, 2**31 - 1, -(2**31)])
    return (
        data[:at] + _varint(index) + data[at + 1 :],
        f"{field_name} enum index {index}",
        record.request_id,
    )


def bad_union_index(ctx: _Context) -> Made:
    """A union branch index out of range; -1 on a ``["null", X]`` field present as X reads X's branch
    under fastavro alone, so the request would look valid."""
    field_name = ctx.rng.choice(["negative_prompt", "seed", "deadline_ms", "reply_topic", "video"])
    values = {"negative_prompt": "blurry", "seed": 12345, "deadline_ms": ctx.now_ms + HOUR_MS,
              "reply_topic": None, "video": None}  # fmt: skip
    record = ctx.request(**{field_name: values[field_name]})
    data = ctx.encode(record)
    at = _field_at(ctx, record, field_name)
    index = ctx.rng.choice([-1, -1, -2, 2, 3, -(2**63)])
    return (
        data[:at] + _varint(index) + data[at + 1 :],
        f"{field_name} union index {index}",
        record.request_id,
    )


def empty(ctx: _Context) -> Made:
    return b"", "zero bytes"


def random_bytes(ctx: _Context) -> Made:
    size = ctx.rng.choice([1, 2, 9, 10, 11, ctx.rng.randrange(12, 4096)])
    data = ctx.rng.randbytes(size)
    if ctx.rng.random() < 0.4 and size > HEADER_LEN:  # the right header, a random body
        data = MARKER + ctx.codec.schema("GenerationRequest").fingerprint + data[HEADER_LEN:]
    return data, f"{size} random bytes"


def trailing_bytes(ctx: _Context) -> Made:
    record = ctx.request()
    junk = ctx.rng.randbytes(ctx.rng.randrange(1, 64))
    return ctx.encode(record) + junk, f"{len(junk)} bytes after the record", record.request_id


def huge_undecodable(ctx: _Context) -> Made:
    """A multi-megabyte request cut one byte short: its dead letter is as big as it is."""
    record = ctx.request(prompt=ctx.words(3 * MiB))
    data = ctx.encode(record)
    return data[:-1], f"{len(data) - 1} B, last byte cut", record.request_id


# -- decodable kinds (rejected) ---------------------------------------------------------------------

ABSURD_INTS = [-1, 0, -(2**31), 2**31 - 1, 1025, 1032, 63, 65, 100_000]


def negative_or_absurd_sizes(ctx: _Context) -> Made:
    field_name = ctx.rng.choice(["width", "height", "steps", "num_images", "num_frames", "fps", "guidance"])
    value = ctx.rng.choice(ABSURD_INTS)
    if field_name in ("num_frames", "fps"):
        if field_name == "num_frames" and value in (63, 65):
            value = 257
        video = VideoSpec(
            **{"num_frames": 8, "fps": 8, "prompt_end": None, "seed_end": None, field_name: value}
        )
        return ctx.encode(ctx.request(kind="VIDEO", video=video)), f"video.{field_name}={value}"
    if field_name == "guidance":
        scale = ctx.rng.choice([float("nan"), float("inf"), -float("inf"), -1.0, 30.5, 1e308])
        return ctx.encode(ctx.request(guidance_scale=scale)), f"guidance_scale={scale}"
    if field_name == "steps" and value in (63, 65):
        value = 151
    return ctx.encode(ctx.request(**{field_name: value})), f"{field_name}={value}"


def _bad_id(ctx: _Context) -> str:
    """A unique, identifiable id that breaks ^[A-Za-z0-9_-]{1,64}$."""
    base = ctx.rid()
    return ctx.rng.choice(
        [
            f"../{base}",
            f"../../{base}/../../etc/passwd",
            f"/abs/path/{base}",
            f"{base}/x",
            f"{base}\x00",
            f"{base}\x00.png",
            f"{base} x",
            f" {base}",
            f"{base}\n",
            f"{base}-" + "x" * 64,
            base.replace("poison", "poison-\u0430"),  # Cyrillic a
            base.replace("poison", "\uff50oison"),  # full-width p
            f"{base}\u200b",  # zero-width space
            f"{base}.",
            f"{base}%2F..",
            f"{base}\\..\\x",
        ]
    )


def bad_ids(ctx: _Context) -> Made:
    if ctx.rng.random() < 0.5:
        record = ctx.request(request_id=_bad_id(ctx))
        return ctx.encode(record), "bad request_id"
    record = ctx.request(tenant_id=_bad_id(ctx).replace("poison-bad-ids", "poison-tenant"))
    return ctx.encode(record), "bad tenant_id"


def unkeyable_ids(ctx: _Context) -> Made:
    """Ids Cassandra cannot key a partition by (empty, longer than 65535 bytes), and a request id so long
    that its Completion (the id as key, in the record and in a header) is over a megabyte. Once each."""
    variants = [
        ("empty request_id", {"request_id": ""}),
        ("70 KB request_id", {"request_id": ctx.rid("-" + "x" * 70_000)}),
        ("70 KB tenant_id", {"tenant_id": "poison-tenant-" + "x" * 70_000}),
        ("400 KB request_id", {"request_id": ctx.rid("-" + "x" * 400_000)}),
    ]
    note, fields = variants[ctx.index % len(variants)]
    return ctx.encode(ctx.request(**fields)), note


def megabyte_prompts(ctx: _Context) -> Made:
    size = ctx.rng.randrange(1 * MiB, 5 * MiB)
    field_name = ctx.rng.choice(["prompt", "negative_prompt"])
    return ctx.encode(ctx.request(**{field_name: ctx.words(size)})), f"{size} B {field_name}"


def past_deadline(ctx: _Context) -> Made:
    created = ctx.now_ms - ctx.rng.randrange(10 * 60_000, 24 * HOUR_MS)
    deadline = ctx.rng.randrange(created + 1, ctx.now_ms - 60_000)
    return ctx.encode(ctx.request(created_at=created, deadline_ms=deadline)), "deadline passed"


def foreign_reply_topic(ctx: _Context) -> Made:
    tenant = ctx.tenant()
    topic = ctx.rng.choice(
        [
            f"{ctx.topics.reply_prefix('another-tenant')}.results",
            ctx.topics.reply_prefix("another-tenant"),
            f"{ctx.topics.reply_prefix(tenant)}x",  # a longer tenant name, not a sub-topic
            ctx.topics.completions,
            ctx.topics.render("default", "HIGH"),
            ctx.topics.dlq("gatekeeper"),
            "..",
        ]
    )
    return ctx.encode(ctx.request(tenant_id=tenant, reply_topic=topic)), f"reply_topic={topic}"


def unknown_model(ctx: _Context) -> Made:
    model = ctx.rng.choice(["sd-xl", "", "../tiny-sd", "tiny-sd\x00", "TINY-SD", "tiny-sd ", "/models/x"])
    return ctx.encode(ctx.request(model=model)), f"model={model!r}"


def absurd_timestamps(ctx: _Context) -> Made:
    if ctx.rng.random() < 0.6:
        created = ctx.rng.choice([2**63 - 1, -(2**63), 0, -1, ctx.now_ms + 2 * HOUR_MS, 10**15])
        record = ctx.request(created_at=created)
        if ctx.rng.random() < 0.5:  # break an earlier field too, so created_at is never checked
            record.width = 65
        return ctx.encode(record), f"created_at={created}"
    deadline = ctx.rng.choice([-(2**63), 2**63 - 1, 0, ctx.now_ms + 30 * 24 * HOUR_MS])
    return ctx.encode(ctx.request(deadline_ms=deadline)), f"deadline_ms={deadline}"


def control_chars(ctx: _Context) -> Made:
    text = ctx.rng.choice(["a\x00b", "\x1b[31mred\x1b[0m", "del\x7f", "bell\x07", "   ", "\t\n\r"])
    field_name = ctx.rng.choice(["prompt", "negative_prompt", "prompt_end"])
    if field_name != "prompt" and not text.strip():  # blank is fine where the text is optional
        text = "nul\x00"
    if field_name == "prompt_end":
        video = VideoSpec(num_frames=8, fps=8, prompt_end=text, seed_end=None)
        return ctx.encode(ctx.request(kind="VIDEO", video=video)), f"video.prompt_end={text!r}"
    return ctx.encode(ctx.request(**{field_name: text})), f"{field_name}={text!r}"


def bad_headers(ctx: _Context) -> Made:
    """An invalid request (width 65) under garbage headers and keys; the body's ids are what count."""
    return ctx.encode(ctx.request(width=65)), "garbage headers"


def oversized_echo(ctx: _Context) -> Made:
    """Fields an invalid request's rejection may echo back (labels, the scheduler in the message), huge."""
    choice = ctx.index % 3
    if choice == 0:
        record = ctx.request(width=65, labels={"big": ctx.words(2 * MiB)})
        note = "2 MB label value"
    elif choice == 1:
        record = ctx.request(labels={f"k{i:06d}": "v" for i in range(150_000)})
        note = "150000 labels"
    else:
        record = ctx.request(scheduler=ctx.words(2 * MiB))
        note = "2 MB scheduler"
    return ctx.encode(record), note


Generator = Callable[[_Context], Made]
# kind -> (generator, most events of that kind; None: an equal share of the rest)
GENERATORS: dict[str, tuple[Generator, int | None]] = {
    "truncated": (truncated, None),
    "wrong_marker": (wrong_marker, None),
    "unknown_fingerprint": (unknown_fingerprint, None),
    "wrong_schema": (wrong_schema, None),
    "bad_utf8": (bad_utf8, None),
    "huge_string": (huge_string, None),
    "huge_array": (huge_array, None),
    "bad_enum_index": (bad_enum_index, None),
    "bad_union_index": (bad_union_index, None),
    "negative_or_absurd_sizes": (negative_or_absurd_sizes, None),
    "bad_ids": (bad_ids, None),
    "megabyte_prompts": (megabyte_prompts, 4),
    "empty": (empty, 10),
    "random_bytes": (random_bytes, None),
    "trailing_bytes": (trailing_bytes, None),
    "huge_undecodable": (huge_undecodable, 1),
    "past_deadline": (past_deadline, None),
    "foreign_reply_topic": (foreign_reply_topic, None),
    "unknown_model": (unknown_model, None),
    "absurd_timestamps": (absurd_timestamps, None),
    "control_chars": (control_chars, None),
    "bad_headers": (bad_headers, None),
    "oversized_echo": (oversized_echo, 3),
    "unkeyable_ids": (unkeyable_ids, 4),
}


def judge(
    settings: Settings, value: bytes, now_ms: int, codec: Codec | None = None
) -> tuple[str, str | None, str | None, str | None, str]:
    """(expect, request_id, tenant_id, status, reason_code) of ``value``, from the codec and validator.

    Raises ValueError for a request that would be accepted: that is not poison. The rule is the
    pipeline's contract: bytes that decode into a request with a usable id are answered (REJECTED,
    EXPIRED); bytes that do not decode, and requests whose request_id is not a valid id (nothing could
    be answered or recorded under it), are dead-lettered.
    """
    codec = codec or default_codec()
    try:
        request = codec.read(value, GenerationRequest)
    except DecodeError as exc:
        return "dead_letter", None, None, None, exc.code
    request_id, tenant_id = request.request_id, request.tenant_id
    if not ID_PATTERN.fullmatch(request_id):
        return "dead_letter", request_id, tenant_id, None, "INVALID_REQUEST_ID"
    topics = Topics(settings)
    try:
        validate_request(request, settings.limits, settings.models.keys(), topics.reply_prefix, now_ms)
    except ValidationError as exc:
        return "rejected", request_id, tenant_id, "REJECTED", exc.code
    if request.deadline_ms is not None and request.deadline_ms <= now_ms:
        return "rejected", request_id, tenant_id, "EXPIRED", "DEADLINE_EXCEEDED"
    raise ValueError(f"{request_id!r} is a valid request, not poison")


def _headers(ctx: _Context, kind: str, request_id: str | None, tenant_id: str | None) -> list[Header]:
    rng = ctx.rng
    if kind == "bad_headers":
        return [
            (
                "traceparent",
                rng.choice([b"\xff\xfe\x00", b"00-zz-yy-01", b"", b"00-" + b"0" * 32 + b"-1-01"]),
            ),
            ("request_id", b"valid-spoofed-id"),
            ("tenant_id", b"another-tenant"),
            ("request_id", None),
            ("\u00e9t\u00e9", rng.randbytes(32)),
            ("big", rng.randbytes(100_000)),
            *[(f"h{i}", b"x") for i in range(100)],
        ]
    style = rng.randrange(3)
    if style == 0 or request_id is None:
        return []
    return [
        (k, v if isinstance(v, bytes) or v is None else v.encode())
        for k, v in pipeline_headers(request_id, tenant_id or "", "00-not-a-trace")
    ]


def _key(ctx: _Context, kind: str, tenant_id: str | None) -> bytes | None:
    if kind == "bad_headers":
        return ctx.rng.choice([None, b"", b"\xff\xfe", b"another-tenant", ctx.rng.randbytes(50_000)])
    if tenant_id is not None and ctx.rng.random() < 0.8:
        return tenant_id.encode()
    return ctx.rng.choice([None, b"", ctx.tenant().encode()])


def poison_corpus(
    settings: Settings, n: int, seed: int, now_ms: int | None = None, codec: Codec | None = None
) -> list[PoisonEvent]:
    """At least ``n`` poison events over every kind in `GENERATORS`, shuffled; deterministic given
    ``seed`` and ``now_ms`` (default: the clock)."""
    now = clock_ms() if now_ms is None else now_ms
    codec = codec or default_codec()
    topics = Topics(settings)
    capped = sum(cap for _, cap in GENERATORS.values() if cap is not None)
    shared = [k for k, (_, cap) in GENERATORS.items() if cap is None]
    each = max(1, -(-(n - capped) // len(shared)))
    events: list[PoisonEvent] = []
    seen_ids: set[str] = set()
    for index, (kind, (generate, cap)) in enumerate(GENERATORS.items()):
        ctx = _Context(settings, codec, topics, random.Random(f"{seed}:{index}:{kind}"), now, kind)
        for ctx.index in range(cap if cap is not None else each):
            made = generate(ctx)
            value, note = made[0], made[1]
            source = made[2] if len(made) == 3 else None  # type: ignore[misc]
            if len(value) >= MAX_MESSAGE:
                raise ValueError(f"{kind}: {len(value)} bytes is over the corpus limit")
            expect, request_id, tenant_id, status, reason = judge(settings, value, now, codec)
            if expect == "rejected":
                if request_id in seen_ids:
                    raise ValueError(f"{kind}: request id {request_id[:80]!r} is used twice")
                seen_ids.add(request_id)  # type: ignore[arg-type]
            events.append(
                PoisonEvent(
                    kind=kind,
                    topic=topics.requests(ctx.rng.choice(PRIORITIES)),
                    key=_key(ctx, kind, tenant_id),
                    value=value,
                    headers=_headers(ctx, kind, request_id, tenant_id),
                    request_id=request_id,
                    tenant_id=tenant_id,
                    expect=expect,
                    status=status,
                    reason_code=reason,
                    source_request_id=source if expect == "dead_letter" else None,
                    note=note,
                )
            )
    random.Random(seed).shuffle(events)
    return events
