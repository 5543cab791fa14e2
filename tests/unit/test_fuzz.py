"""Property-based fuzzing of the three places hostile bytes meet the pipeline: the codec, the request
validator and the gatekeeper's admission decision.

Every property runs with a fixed seed (``derandomize=True``), so CI sees the same examples on every run;
a failure found locally is reproducible from the printed example. Records are drawn from strategies built
from the Avro schemas themselves (records, enums, unions, arrays, maps and primitives at their full
ranges, text in any Unicode but surrogates, doubles including NaN and infinities), and requests are
biased towards the edges the validator has to get right (sizes around the bounds, path-like ids,
look-alike letters, empty and huge strings).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st

from plumbing.dead_letters import Original
from plumbing.errors import DecodeError, ValidationError
from plumbing.headers import pipeline_headers
from plumbing.settings import GatekeeperSettings, ModelSpec, RequestLimits, Settings, Tier
from plumbing.topics import Stage, Topics
from plumbing.validation import validate_request
from schemas.codec import DECODE_CODES, HEADER_LEN, MARKER, Codec
from schemas.records import Completion, DeadLetter, GenerationRequest, Header, RenderTask, VideoSpec
from stream_processors.gatekeeper.admission import Gate
from stream_processors.gatekeeper.moderation import DEFAULT_POLICY_PATH, Moderator, Policy

EXAMPLES = 500
NOW = 1_700_000_000_000
HOUR_MS = 3600 * 1000
HISTORY = Path(__file__).parent / "data"
SAFE_ID = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")
# What a stored object's key may look like: validated ids, digits, dots and slashes, nothing else.
SAFE_KEY = re.compile(r"\A[A-Za-z0-9_-]{1,64}/[A-Za-z0-9_./-]+\Z")
MAX_DECISION_BYTES = 500_000  # ids in these requests reach 100,000 characters; the rest must stay small
VERDICTS = {"ACCEPTED", "REJECTED", "CANCELLED", "EXPIRED", "DUPLICATE", "DEAD_LETTERED"}

# A fixed seed for CI; no deadline (a 2 MB field or a moderation pass is slow on a loaded 2-core runner,
# and speed is not what is tested). No health check needs suppressing.
FUZZ = settings(derandomize=True, max_examples=EXAMPLES, deadline=None)

codec = Codec()
# The same schemas plus an older GenerationRequest, so a fingerprint can also select schema resolution.
history_codec = Codec(extra_history=sorted(HISTORY.glob("*.avsc")))
RECORDS = codec.records
FINGERPRINTS = sorted(
    {codec.schema(r).fingerprint for r in RECORDS}
    | {schema_fp for schema_fp in history_codec._by_fingerprint}
)


# -- strategies from Avro schemas -------------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
PRIMITIVES: dict[str, st.SearchStrategy[Any]] = {
    "null": st.none(),
    "boolean": st.booleans(),
    "int": st.integers(-(2**31), 2**31 - 1),
    "long": st.integers(-(2**63), 2**63 - 1),
    "float": st.floats(width=32),
    "double": st.floats(),
    "bytes": st.binary(max_size=64),
    "string": TEXT,
}


def avro_strategy(schema: Any, names: dict[str, st.SearchStrategy[Any]], namespace: str = "") -> Any:
    """A strategy for data that fits ``schema`` (JSON-shaped); named types are registered in ``names``."""
    if isinstance(schema, str):
        if schema in PRIMITIVES:
            return PRIMITIVES[schema]
        return names[schema if schema in names else f"{namespace}.{schema}"]
    if isinstance(schema, list):
        return st.one_of([avro_strategy(branch, names, namespace) for branch in schema])
    kind = schema["type"]
    if kind in PRIMITIVES:
        return PRIMITIVES[kind]
    if kind == "array":
        return st.lists(avro_strategy(schema["items"], names, namespace), max_size=4)
    if kind == "map":
        return st.dictionaries(TEXT, avro_strategy(schema["values"], names, namespace), max_size=4)
    ns = schema.get("namespace", namespace)
    full = schema["name"] if "." in schema["name"] else f"{ns}.{schema['name']}"
    if kind == "enum":
        strategy: Any = st.sampled_from(schema["symbols"])
    elif kind == "fixed":
        strategy = st.binary(min_size=schema["size"], max_size=schema["size"])
    elif kind == "record":
        fields = {f["name"]: avro_strategy(f["type"], names, ns) for f in schema["fields"]}
        strategy = st.fixed_dictionaries(fields)
    else:
        raise ValueError(f"unsupported Avro type {kind!r}")
    names[full] = names[schema["name"].rsplit(".", 1)[-1]] = strategy
    return strategy


def _schema_json(record: str) -> Any:
    return json.loads(codec.schema(record).source.read_text(encoding="utf-8"))


RECORD_STRATEGIES = {r: avro_strategy(_schema_json(r), {}) for r in RECORDS}
any_record = st.sampled_from(RECORDS).flatmap(lambda r: st.tuples(st.just(r), RECORD_STRATEGIES[r]))


def same(a: Any, b: Any) -> bool:
    """Deep equality in which NaN equals NaN (it never equals itself)."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


# -- mutations of valid encodings -------------------------------------------------------------------


def _varint(value: int) -> bytes:
    """Avro's zig-zag varint of a long: what a length prefix or a block count looks like."""
    n = (value << 1) ^ (value >> 63)
    n &= 2**64 - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


ABSURD = [-1, -(2**31), 2**31 - 1, 2**31, 2**40, 2**62, -(2**63), 2**63 - 1, 0, 1]


@st.composite
def mutation(draw: st.DrawFn) -> Callable[[bytes], bytes]:
    kind = draw(
        st.sampled_from(
            ["flip", "truncate", "insert", "delete", "overwrite", "prefix", "marker", "fingerprint"]
        )
    )
    pos = draw(st.integers(0, 2**16))
    if kind == "flip":
        bit = draw(st.integers(0, 7))
        return lambda d: (
            d if not d else d[: pos % len(d)] + bytes([d[pos % len(d)] ^ (1 << bit)]) + d[pos % len(d) + 1 :]
        )
    if kind == "truncate":
        return lambda d: d[: pos % (len(d) + 1)]
    if kind == "insert":
        junk = draw(st.binary(min_size=1, max_size=16))
        return lambda d: d[: pos % (len(d) + 1)] + junk + d[pos % (len(d) + 1) :]
    if kind == "delete":
        length = draw(st.integers(1, 16))
        return lambda d: d[: pos % (len(d) + 1)] + d[pos % (len(d) + 1) + length :]
    if kind == "overwrite":
        byte = draw(st.sampled_from([0x00, 0x01, 0x02, 0x7F, 0x80, 0xFF, 0xFE, 0xC3]))
        return lambda d: d if not d else d[: pos % len(d)] + bytes([byte]) + d[pos % len(d) + 1 :]
    if kind == "prefix":
        # A corrupt length prefix or block count: an absurd varint where the body had some byte.
        value = draw(st.sampled_from(ABSURD) | st.integers(-(2**63), 2**63 - 1))
        replace = draw(st.integers(0, 3))

        def corrupt(d: bytes) -> bytes:
            body = len(d) - HEADER_LEN
            if body <= 0:
                return d + _varint(value)
            at = HEADER_LEN + pos % body
            return d[:at] + _varint(value) + d[at + replace :]

        return corrupt
    if kind == "marker":
        marker = draw(st.binary(min_size=2, max_size=2))
        return lambda d: marker + d[2:]
    fp = draw(st.sampled_from(FINGERPRINTS) | st.binary(min_size=8, max_size=8))
    return lambda d: d[:2] + fp + d[HEADER_LEN:]


def encoded(record: str, datum: dict[str, Any]) -> bytes:
    return codec.encode(record, datum)


mutated = st.tuples(any_record, st.lists(mutation(), min_size=1, max_size=4)).map(
    lambda t: _apply(encoded(*t[0]), t[1])
)


def _apply(data: bytes, mutations: list[Callable[[bytes], bytes]]) -> bytes:
    for m in mutations:
        data = m(data)
    return data


raw_bytes = st.one_of(
    st.binary(max_size=256),
    st.tuples(st.sampled_from(FINGERPRINTS), st.binary(max_size=256)).map(lambda t: MARKER + t[0] + t[1]),
)


def decode_outcome(c: Codec, data: bytes, expect: str | None) -> dict[str, Any] | DecodeError:
    """The record, or the DecodeError; any other exception escapes and fails the property."""
    try:
        return c.decode(data, expect)
    except DecodeError as exc:
        return exc


def assert_decode_is_total(data: bytes) -> None:
    for c in (codec, history_codec):
        for expect in (None, *RECORDS):
            result = decode_outcome(c, data, expect)
            if isinstance(result, DecodeError):
                assert result.code in DECODE_CODES, result.code
            else:
                assert isinstance(result, dict)
                record = c.decode_any(data)[0]
                if data[2:HEADER_LEN] == c.schema(record).fingerprint:  # strict: decoded means canonical
                    assert c.encode(record, result) == data


# -- codec properties -------------------------------------------------------------------------------


@FUZZ
@given(any_record)
def test_every_record_round_trips(named: tuple[str, dict[str, Any]]) -> None:
    record, datum = named
    data = codec.encode(record, datum)
    name, decoded = codec.decode_any(data)
    assert name == record
    assert same(decoded, codec.decode(data, record))  # NaN != NaN, so not ==
    assert same(codec.decode(data, record), datum)


@FUZZ
@given(raw_bytes)
def test_decoding_arbitrary_bytes_returns_a_record_or_raises_decode_error(data: bytes) -> None:
    assert_decode_is_total(data)


@FUZZ
@given(mutated)
def test_decoding_a_mutated_encoding_returns_a_record_or_raises_decode_error(data: bytes) -> None:
    assert_decode_is_total(data)


# -- requests biased towards the validator's edges --------------------------------------------------

LIMITS = RequestLimits()
MODELS = {"tiny-sd"}
TOPIC_PREFIX = "aigc"


def reply_prefix(tenant_id: str) -> str:
    return f"{TOPIC_PREFIX}.reply.{tenant_id}"


EDGE_IDS = [
    "",
    " ",
    "a" * 64,
    "a" * 65,
    "../etc",
    "..",
    ".",
    "a/b",
    "/abs/path",
    "a\x00b",
    "a b",
    "a\nb",
    "a\n",
    "\u0430cme",  # Cyrillic a
    "\uff41cme",  # full-width a
    "acme\u200b",  # zero-width space
    "ACME_ok-1",
    "x" * 100_000,
]
valid_ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
ids = st.one_of(valid_ids, st.sampled_from(EDGE_IDS), TEXT)


def around(*points: int, spread: int = 9) -> st.SearchStrategy[int]:
    """Integers within ``spread`` of any of ``points``, kept inside Avro's long."""
    low, high = -(2**63), 2**63 - 1
    points = tuple(min(high - spread, max(low + spread, p)) for p in points)
    return st.one_of(*[st.integers(p - spread, p + spread) for p in points])


def in_long(n: int) -> bool:
    """Whether ``n`` fits Avro's long (a deadline after an edge ``created_at`` may not)."""
    return -(2**63) <= n <= 2**63 - 1


INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
good_prompts = st.text(st.characters(codec="utf-8", categories=("L", "N", "Zs")), min_size=1, max_size=60)
edge_texts = st.one_of(
    TEXT,
    st.sampled_from(["", " ", "\t\n", "a\x00b", "a\x7fb", "a\u202eb", "\u200b", "x" * 3_000_000]),
    st.integers(LIMITS.max_prompt_chars - 2, LIMITS.max_prompt_chars + 2).map(lambda n: "p" * n),
)
edge_labels = st.one_of(
    st.dictionaries(TEXT, TEXT, max_size=4),
    st.integers(LIMITS.max_labels - 1, LIMITS.max_labels + 1).map(lambda n: {f"k{i}": "v" for i in range(n)}),
    st.integers(LIMITS.max_label_chars - 1, LIMITS.max_label_chars + 1).map(lambda n: {"k": "v" * n}),
    st.integers(LIMITS.max_label_chars - 1, LIMITS.max_label_chars + 1).map(lambda n: {"k" * n: "v"}),
    st.sampled_from([{"big": "v" * 2_000_000}, {f"k{i}": "v" for i in range(100_000)}]),
)


def _reply_topics(tenant: str) -> st.SearchStrategy[str | None]:
    prefix = reply_prefix(tenant)
    return st.one_of(
        st.none(),
        st.sampled_from(
            [
                *(prefix, f"{prefix}.results", f"{prefix}x", f"{reply_prefix('someone-else')}.results"),
                *("..", ".", "a/b", "t" * 250, f"{prefix}.{'r' * 250}"),
            ]
        ),
        TEXT,
    )


# Each field: values that pass validation, and the edges (which may or may not pass).
def _fields(created_at: int, tenant: str) -> dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]]:
    sizes = st.integers(LIMITS.min_size // 8, LIMITS.max_size // 8).map(lambda n: n * 8)
    edge_sizes = st.one_of(
        around(LIMITS.min_size, LIMITS.max_size), st.sampled_from([0, -8, 2**31 - 1, -(2**31)]), INT32
    )
    return {
        "request_id": (valid_ids, ids),
        "tenant_id": (st.just(tenant), ids),
        "prompt": (good_prompts, edge_texts),
        "negative_prompt": (st.none() | good_prompts, edge_texts),
        "model": (st.just("tiny-sd"), st.sampled_from(["", "tiny-sd ", "TINY-SD", "../tiny-sd"]) | TEXT),
        "width": (sizes, edge_sizes),
        "height": (sizes, edge_sizes),
        "steps": (st.integers(1, LIMITS.max_steps), around(0, LIMITS.max_steps, spread=2) | INT32),
        "guidance_scale": (
            st.floats(LIMITS.min_guidance, LIMITS.max_guidance),
            st.floats() | st.sampled_from([-0.0, 30.000001, -1e-300, 1e308]),
        ),
        "num_images": (st.integers(1, LIMITS.max_images), around(1, LIMITS.max_images, spread=2) | INT32),
        "num_frames": (st.integers(2, 24), around(2, LIMITS.max_frames, spread=2) | INT32),
        "fps": (
            st.integers(LIMITS.min_fps, LIMITS.max_fps),
            around(LIMITS.min_fps, LIMITS.max_fps, spread=2),
        ),
        "prompt_end": (st.none() | good_prompts, edge_texts),
        "scheduler": (
            st.sampled_from([None, "ddim", "euler", "dpm", "pndm"]),
            st.sampled_from(["lms", "", "s" * 2_000_000]) | TEXT,
        ),
        "reply_topic": (st.sampled_from([None, reply_prefix(tenant.lower())]), _reply_topics(tenant)),
        "deadline_ms": (
            st.none() | st.integers(created_at + 1, created_at + LIMITS.max_deadline_ms).filter(in_long),
            st.none() | around(created_at, created_at + LIMITS.max_deadline_ms, NOW, spread=2) | INT64,
        ),
        "labels": (st.dictionaries(valid_ids, good_prompts, max_size=3), edge_labels),
        "seed": (st.none() | INT64, st.sampled_from([-(2**63), 2**63 - 1])),
        "seed_end": (st.none() | INT64, st.sampled_from([-(2**63), 2**63 - 1])),
    }


EDGE_CREATED_AT = st.one_of(
    around(NOW, NOW + HOUR_MS, spread=2), st.sampled_from([0, -1, 1, 2**63 - 1, -(2**63)]), INT64
)


@st.composite
def generation_requests(draw: st.DrawFn) -> GenerationRequest:
    """A record that fits the GenerationRequest schema: a valid request with up to three fields (and the
    kind, output format and created_at) pushed to the validator's edges, so each rule is met alone and in
    company, and some requests pass."""
    tenant = draw(valid_ids)
    broken = draw(st.sets(st.sampled_from([*_fields(NOW, tenant), "created_at", "kind"]), max_size=3))
    created_at = draw(EDGE_CREATED_AT if "created_at" in broken else st.integers(NOW - HOUR_MS, NOW))
    fields = _fields(created_at, tenant)
    value = {name: draw(edge if name in broken else good) for name, (good, edge) in fields.items()}
    video = draw(st.booleans())
    if "kind" in broken:
        kind = draw(st.sampled_from(["IMAGE", "VIDEO"]))
        spec = draw(st.booleans())
    else:
        kind, spec = ("VIDEO", True) if video else ("IMAGE", False)
    fmt_ok = ["MP4"] if kind == "VIDEO" else ["PNG", "JPEG"]
    fmt = draw(
        st.sampled_from([None, *fmt_ok])
        if "kind" not in broken
        else st.sampled_from([None, "PNG", "JPEG", "MP4"])
    )
    return GenerationRequest(
        request_id=value["request_id"],
        tenant_id=value["tenant_id"],
        priority=draw(st.sampled_from(["HIGH", "NORMAL", "LOW"])),
        kind=kind,
        prompt=value["prompt"],
        negative_prompt=value["negative_prompt"],
        model=value["model"],
        width=value["width"],
        height=value["height"],
        steps=value["steps"],
        guidance_scale=value["guidance_scale"],
        seed=value["seed"],
        num_images=value["num_images"] if kind == "IMAGE" or "num_images" in broken else 1,
        video=VideoSpec(
            num_frames=value["num_frames"],
            fps=value["fps"],
            prompt_end=value["prompt_end"],
            seed_end=value["seed_end"],
        )
        if spec
        else None,
        output_format=fmt,
        scheduler=value["scheduler"],
        reply_topic=value["reply_topic"],
        deadline_ms=value["deadline_ms"],
        labels=value["labels"],
        created_at=created_at,
    )


HUGE = 2_000_000


@st.composite
def huge_field_requests(draw: st.DrawFn) -> GenerationRequest:
    """A valid request but for one field of megabytes: what a rejection must not echo back in full."""
    record = draw(generation_requests())
    field = draw(
        st.sampled_from(["prompt", "negative_prompt", "model", "scheduler", "labels", "reply_topic"])
    )
    if field == "labels":
        return replace(record, labels=draw(st.sampled_from([{"big": "v" * HUGE}, {"k" * HUGE: "v"}])))
    return replace(record, **{field: "x" * HUGE})


# Mostly requests near the rules; some with a huge field; some anything the schema allows.
requests = st.one_of(
    generation_requests(),
    generation_requests(),
    huge_field_requests(),
    RECORD_STRATEGIES["GenerationRequest"].map(GenerationRequest.from_avro),
)


def check_valid_request_is_safe(
    record: GenerationRequest, allowed_reply_prefix: Callable[[str], str] = reply_prefix
) -> None:
    """What a request that passed validation guarantees downstream (S3 keys, Cassandra keys, topics)."""
    from plumbing.blobs import frame_key, result_prefix

    for field, value in (("request_id", record.request_id), ("tenant_id", record.tenant_id)):
        assert SAFE_ID.match(value), (field, value)
    for size in (record.width, record.height):
        assert type(size) is int and LIMITS.min_size <= size <= LIMITS.max_size and size % 8 == 0
    assert type(record.steps) is int and 1 <= record.steps <= LIMITS.max_steps
    assert math.isfinite(record.guidance_scale)
    assert LIMITS.min_guidance <= record.guidance_scale <= LIMITS.max_guidance
    assert record.model in MODELS
    assert record.prompt.strip() and len(record.prompt) <= LIMITS.max_prompt_chars
    if record.kind == "VIDEO":
        assert record.video is not None
        assert 2 <= record.video.num_frames <= LIMITS.max_frames
        assert LIMITS.min_fps <= record.video.fps <= LIMITS.max_fps
    else:
        assert record.video is None and 1 <= record.num_images <= LIMITS.max_images
    assert 0 < record.created_at <= NOW + HOUR_MS
    if record.deadline_ms is not None:
        assert record.created_at < record.deadline_ms
    assert len(record.labels) <= LIMITS.max_labels
    if record.reply_topic is not None:
        assert record.reply_topic.startswith(allowed_reply_prefix(record.tenant_id))
    # The keys the renderer and the assembler derive from the ids stay inside the tenant's prefix.
    for key in (
        frame_key(record.tenant_id, record.request_id, 0),
        result_prefix(record.tenant_id, record.request_id, record.created_at) + "image-0.png",
    ):
        assert SAFE_KEY.match(key) and key.startswith(record.tenant_id + "/"), key
        assert ".." not in key.split("/") and "//" not in key


@FUZZ
@given(requests)
def test_validation_returns_none_or_raises_validation_error_naming_the_field(
    record: GenerationRequest,
) -> None:
    error: ValidationError | None = None
    try:
        result = validate_request(record, LIMITS, MODELS, reply_prefix, NOW)
    except ValidationError as exc:
        error = exc
    if error is not None:
        event(f"rejected {error.code}")
        assert error.field and isinstance(error.field, str)
        assert error.code and re.fullmatch(r"[A-Z][A-Z0-9_]*", error.code), error.code
    else:
        event("valid")
        assert result is None
        check_valid_request_is_safe(record)


# -- the gatekeeper's admission ---------------------------------------------------------------------

GATE_SETTINGS = Settings.load(
    models={"tiny-sd": ModelSpec(path=Path("/models/tiny-sd"), backend="synthetic")},
    gatekeeper=GatekeeperSettings(tiers={"standard": Tier()}, dedupe_window_s=60),
)
TOPICS = Topics(GATE_SETTINGS)
gate = Gate(GATE_SETTINGS, codec, Moderator(Policy.from_file(DEFAULT_POLICY_PATH)))


def _original(value: bytes, key: bytes | None = b"tenant") -> Original:
    headers: list[tuple[str, bytes | None]] = [
        (k, v if isinstance(v, bytes) or v is None else v.encode())
        for k, v in pipeline_headers("r", "t", "00-bad-traceparent")
    ]
    headers.append(("junk", b"\xff\xfe"))
    headers.append(("none", None))
    return Original(TOPICS.requests("NORMAL"), 3, 1234, NOW - 5, key, value, headers)


def assert_admission_is_sound(value: bytes) -> None:
    message = _original(value)
    try:
        decoded: GenerationRequest | None = codec.read(value, GenerationRequest)
    except DecodeError:
        decoded = None
    admission = gate.admit(message, {}, {}, NOW)  # must not raise, whatever the bytes
    event(f"{admission.verdict} {admission.reason or ''}".strip())
    assert admission.verdict in VERDICTS
    # Undecodable bytes, and requests without a usable id (nothing could be answered under it), go to
    # the dead-letter topic intact; everything else is answered.
    if decoded is None or not SAFE_ID.match(decoded.request_id):
        assert admission.verdict == "DEAD_LETTERED"
        [out] = admission.outputs
        assert out.topic == TOPICS.dlq(Stage.GATEKEEPER)
        assert out.key == message.key
        letter = codec.read(out.value, DeadLetter)
        assert letter.value == value  # byte for byte
        assert letter.key == message.key
        assert letter.headers == [Header(key=k, value=v) for k, v in message.headers]
        assert (letter.original_topic, letter.original_offset) == (message.topic, message.offset)
        assert letter.error_code
        assert (admission.seen, admission.bucket) == (None, None)
        return
    assert admission.verdict != "DEAD_LETTERED"
    assert admission.request_id == decoded.request_id
    if admission.verdict == "ACCEPTED":
        tasks = [codec.read(o.value, RenderTask) for o in admission.outputs if ".render." in o.topic]
        assert tasks
        for task in tasks:
            assert SAFE_ID.match(task.request_id) and SAFE_ID.match(task.tenant_id)
            assert task.request_id == decoded.request_id
        check_valid_request_is_safe(decoded, TOPICS.reply_prefix)
    elif admission.verdict in {"REJECTED", "EXPIRED", "CANCELLED"}:
        [out] = admission.outputs
        assert out.topic in TOPICS.all_decisions()
        # The gatekeeper's producer refuses messages over 1,000,000 bytes (faust's default), and a send
        # it refuses crashes the worker: whatever a request carries, its answer must stay well below.
        size = len(out.value) + len(out.key or b"") + sum(len(k) + len(v or b"") for k, v in out.headers)
        assert size < MAX_DECISION_BYTES, size
        completion = codec.read(out.value, Completion)
        assert completion.status == admission.verdict
        assert completion.reason_code
        assert completion.request_id == decoded.request_id


@FUZZ
@given(st.one_of(raw_bytes, mutated))
def test_admission_of_arbitrary_bytes_never_raises(value: bytes) -> None:
    assert_admission_is_sound(value)


@FUZZ
@given(requests)
def test_admission_of_schema_valid_requests_never_raises(record: GenerationRequest) -> None:
    assert_admission_is_sound(codec.write(record))
