"""Strict decoding: only the canonical Avro encoding of a datum decodes; everything else has a named code.

The explicit cases are the ones fastavro lets through or mishandles on its own (a negative enum or union
index wraps to the last symbol or branch, a varint past 64 bits wraps, an ``int`` past 32 bits is
accepted, an array count is allocated before the bytes are checked). The properties mutate valid
encodings, every byte with several replacement values and then with hypothesis, and require each
result to be rejected with a known code or to re-encode to exactly the bytes that were decoded.
"""

from __future__ import annotations

import io
import math
import struct
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plumbing.errors import DecodeError
from schemas.canonical import compile_check
from schemas.codec import DECODE_CODES, HEADER_LEN, Codec
from tests.unit.test_codec import image_request as request

codec = Codec()


def zigzag(value: int) -> bytes:
    """Avro's zigzag varint of ``value`` (any size: callers make over-long ones on purpose)."""
    n = (value << 1) ^ (value >> 63) if value >= -(2**63) else (-value << 1) - 1
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if not n:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


SAMPLES: list[tuple[str, dict[str, Any]]] = [
    ("GenerationRequest", request()),
    (
        "GenerationRequest",
        request(
            kind="VIDEO",
            video={"num_frames": 16, "fps": 8, "prompt_end": "night", "seed_end": -9},
            labels={"a": "1", "team": "ü"},
            negative_prompt="blurry",
            seed=2**40,
            deadline_ms=2**33,
            priority="LOW",
            guidance_scale=math.nan,
        ),
    ),
    (
        "Completion",
        {
            "request_id": "r",
            "tenant_id": "t",
            "status": "SUCCEEDED",
            "reason_code": "OK",
            "outputs": [
                {
                    "kind": "IMAGE",
                    "uri": "s3://b/k",
                    "presigned_url": "http://x",
                    "content_type": "image/png",
                    "bytes": 10,
                    "width": 64,
                    "height": 64,
                    "duration_ms": None,
                    "frames": 1,
                    "fps": None,
                }
            ],
            "timings": {"queued_ms": 1, "render_ms": 2, "assemble_ms": 3, "total_ms": 6},
            "finished_at": 1,
        },
    ),
]


def offset_of(record: str, datum: dict[str, Any], field: str) -> int:
    """Where ``field`` starts in ``codec.encode(record, datum)``: the length of the fields before it."""
    schema = codec.schema(record).parsed
    names = [f["name"] for f in schema["fields"]]
    before = {"type": "record", "name": "Prefix", "fields": schema["fields"][: names.index(field)]}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(before), datum)
    return HEADER_LEN + len(buf.getvalue())


def replace_field(datum: dict[str, Any], field: str, old_len: int, new: bytes) -> bytes:
    """The encoding of ``datum`` (a GenerationRequest) with ``field``'s first ``old_len`` bytes replaced."""
    data = codec.encode("GenerationRequest", datum)
    at = offset_of("GenerationRequest", datum, field)
    return data[:at] + new + data[at + old_len :]


def rejected(data: bytes) -> DecodeError:
    with pytest.raises(DecodeError) as err:
        codec.decode(data, "GenerationRequest")
    return err.value


# -- what fastavro alone lets through ---------------------------------------------------------------


def test_fastavro_alone_wraps_a_negative_enum_index():
    # The reason for the strict pass: zigzag -1 reads as the last symbol.
    body = replace_field(request(), "priority", 1, zigzag(-1))[HEADER_LEN:]
    schema = codec.schema("GenerationRequest").parsed
    assert fastavro.schemaless_reader(io.BytesIO(body), schema, None)["priority"] == "LOW"


@pytest.mark.parametrize("index", [-1, -2, -3, -(2**31)])
def test_negative_enum_index_is_rejected(index: int):
    err = rejected(replace_field(request(), "priority", 1, zigzag(index)))
    assert err.code == "BAD_ENUM_INDEX"
    assert "GenerationRequest.priority" in str(err) and str(index) in str(err)


@pytest.mark.parametrize("index", [3, 4, 2**31 - 1])
def test_out_of_range_enum_index_is_rejected(index: int):
    assert rejected(replace_field(request(), "priority", 1, zigzag(index))).code == "BAD_ENUM_INDEX"


def test_enum_index_past_int_range_is_rejected():
    assert rejected(replace_field(request(), "priority", 1, zigzag(2**40))).code == "INT_OUT_OF_RANGE"


@pytest.mark.parametrize(
    ("field", "payload"),
    [
        ("negative_prompt", zigzag(6) + b"blurry"),  # -1 would read the string branch's schema ...
        ("seed", zigzag(12345)),  # ... or the long's, on a field that is null
        ("output_format", zigzag(0)),
    ],
)
@pytest.mark.parametrize("index", [-1, -2, -(2**63)])
def test_negative_union_index_is_rejected(field: str, payload: bytes, index: int):
    err = rejected(replace_field(request(), field, 1, zigzag(index) + payload))
    assert err.code == "BAD_UNION_INDEX"
    assert f"GenerationRequest.{field}" in str(err)


@pytest.mark.parametrize("index", [2, 3, 2**62])
def test_out_of_range_union_index_is_rejected(index: int):
    assert rejected(replace_field(request(), "seed", 1, zigzag(index) + zigzag(5))).code == "BAD_UNION_INDEX"


@pytest.mark.parametrize(
    "varint",
    [
        b"\xff" * 10 + b"\x01",  # 11 bytes
        b"\xff" * 9 + b"\x02",  # 10 bytes, past 64 bits
        b"\xff" * 9 + b"\x7f",
        b"\x80" * 20 + b"\x01",
        b"\x80\x00",  # zero, not in its shortest form
        b"\x82\x80\x00",
    ],
)
def test_over_long_or_padded_varint_is_rejected(varint: bytes):
    # created_at is the last field, a long.
    assert rejected(replace_field(request(created_at=1), "created_at", 1, varint)).code == "BAD_VARINT"


@pytest.mark.parametrize("value", [2**31, -(2**31) - 1, 2**40, -(2**63)])
def test_int_past_32_bits_is_rejected(value: int):
    assert rejected(replace_field(request(), "width", 2, zigzag(value))).code == "INT_OUT_OF_RANGE"


def test_int_at_its_bounds_is_accepted():
    for value in (2**31 - 1, -(2**31)):
        assert codec.decode(replace_field(request(), "width", 2, zigzag(value)))["width"] == value


@pytest.mark.parametrize(
    ("field", "old_len", "new"),
    [
        ("prompt", 1, zigzag(10**6)),  # past the remaining bytes
        ("prompt", 1, zigzag(2**62)),
        ("prompt", 1, zigzag(-1)),  # negative
        ("prompt", 1, zigzag(-(2**63))),
        ("labels", 1, zigzag(10**6)),  # block count past the remaining bytes
        ("labels", 1, zigzag(-1) + zigzag(4) + zigzag(1) + b"k" + zigzag(1) + b"v"),  # a sized block
    ],
)
def test_length_negative_or_past_the_end_is_rejected(field: str, old_len: int, new: bytes):
    assert rejected(replace_field(request(), field, old_len, new)).code == "BAD_LENGTH"


def test_huge_count_of_empty_items_is_rejected_before_anything_is_allocated():
    # fastavro would build 2**40 Nones; the strict pass stops at the count.
    check = compile_check({"type": "array", "items": "null"})
    with pytest.raises(DecodeError) as err:
        check(zigzag(2**40) + b"\x00", 0)
    assert err.value.code == "BAD_LENGTH"


def test_second_block_and_duplicate_key_are_rejected():
    entry = zigzag(1) + b"k" + zigzag(1) + b"v"
    two_blocks = zigzag(1) + entry + zigzag(1) + zigzag(1) + b"j" + zigzag(1) + b"w" + b"\x00"
    assert rejected(replace_field(request(), "labels", 1, two_blocks)).code == "NON_CANONICAL"
    twice = zigzag(2) + entry + entry + b"\x00"
    assert rejected(replace_field(request(), "labels", 1, twice)).code == "DUPLICATE_KEY"


def test_boolean_other_than_0_or_1_is_rejected():
    check = compile_check({"type": "record", "name": "B", "fields": [{"name": "b", "type": "boolean"}]})
    assert check(b"\x01", 0) == 1
    with pytest.raises(DecodeError) as err:
        check(b"\x02", 0)
    assert err.value.code == "BAD_BOOLEAN"


def test_trailing_and_truncated_bodies_are_rejected():
    data = codec.encode("GenerationRequest", request())
    assert rejected(data + b"\x00").code == "TRAILING_BYTES"
    assert rejected(data[:-1]).code == "TRUNCATED"


def test_recursive_schema_compiles_and_checks():
    node = {
        "type": "record",
        "name": "Node",
        "fields": [{"name": "v", "type": "int"}, {"name": "next", "type": ["null", "Node"]}],
    }
    check = compile_check(node)
    assert check(zigzag(1) + zigzag(1) + zigzag(2) + zigzag(0), 0) == 4
    with pytest.raises(DecodeError) as err:
        check(zigzag(1) + zigzag(1) + zigzag(2) + zigzag(-1), 0)
    assert err.value.code == "BAD_UNION_INDEX" and "Node.next" in str(err.value)


# -- properties: decoded means canonical ------------------------------------------------------------


def canonical_or_rejected(data: bytes) -> str:
    """'ok' if ``data`` decodes and re-encodes to the same bytes, else the DecodeError code."""
    try:
        record, datum = codec.decode_any(data)
    except DecodeError as exc:
        code = exc.code
    else:
        assert codec.encode(record, datum) == data, (record, datum)
        return "ok"
    assert code in DECODE_CODES, code
    return code


REPLACEMENTS = [0x00, 0x01, 0x02, 0x03, 0x7E, 0x7F, 0x80, 0x81, 0xFE, 0xFF]


@pytest.mark.parametrize(("record", "datum"), SAMPLES, ids=lambda x: x if isinstance(x, str) else "")
def test_every_single_byte_change_is_canonical_or_rejected(record: str, datum: dict[str, Any]):
    data = codec.encode(record, datum)
    assert canonical_or_rejected(data) == "ok"
    outcomes: dict[str, int] = {}
    for pos in range(len(data)):
        variants = [data[:pos] + bytes([b]) + data[pos + 1 :] for b in REPLACEMENTS if b != data[pos]]
        variants.append(data[:pos] + data[pos + 1 :])  # the byte deleted
        variants += [data[:pos] + bytes([b]) + data[pos:] for b in (0x00, 0x01, 0x80)]  # one inserted
        for variant in variants:
            outcome = canonical_or_rejected(variant)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # The walk reached the strict pass's checks, not only the framing's.
    assert {"ok", "BAD_UNION_INDEX", "BAD_LENGTH", "TRUNCATED"} <= outcomes.keys(), outcomes
    if record == "GenerationRequest":
        assert {"BAD_ENUM_INDEX", "BAD_VARINT"} <= outcomes.keys(), outcomes


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    record, datum = draw(st.sampled_from(SAMPLES))
    data = bytearray(codec.encode(record, datum))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(HEADER_LEN, len(data)))
        op = draw(st.sampled_from(["set", "insert", "delete", "varint"]))
        if op == "set" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 4))]
        else:  # a varint (an index, length or count) where the body had one byte
            value = draw(st.integers(-(2**63), 2**63 - 1) | st.sampled_from([-1, -2, -3, 2**31, 2**32]))
            data[pos : pos + 1] = zigzag(value)
    return bytes(data)


@settings(derandomize=True, max_examples=2000, deadline=None)
@given(mutated())
def test_hypothesis_mutations_are_canonical_or_rejected(data: bytes):
    canonical_or_rejected(data)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(st.floats(allow_nan=True) | st.binary(min_size=8, max_size=8).map(lambda b: struct.unpack("<d", b)[0]))
def test_any_double_bit_pattern_round_trips(value: float):
    # NaN payloads included: a double is copied, never rounded, so its bytes survive decode and encode.
    assert canonical_or_rejected(codec.encode("GenerationRequest", request(guidance_scale=value))) == "ok"
