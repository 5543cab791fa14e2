"""The Avro single-object codec: round trips, schema evolution, and typed rejection of bad bytes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from plumbing.errors import DecodeError, EncodeError
from producers.client import new_request
from schemas.codec import HEADER_LEN, MARKER, SCHEMA_DIR, Codec, schema_fingerprint

HISTORY = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec()


def image_request(**fields):
    base = dict(
        request_id="req-1",
        tenant_id="acme",
        prompt="a red fox in snow",
        model="tiny-sd",
        width=64,
        height=64,
        steps=4,
        guidance_scale=7.5,
    )
    return new_request(**{**base, **fields}).to_avro()


def test_fingerprints_match_the_avro_spec_vectors():
    # From the Avro specification's test data (share/test/data/schema-tests.txt).
    assert int.from_bytes(schema_fingerprint("null"), "little") == 7195948357588979594
    assert int.from_bytes(schema_fingerprint("int"), "little") == 8247732601305521295


def test_header_is_marker_and_fingerprint(codec: Codec):
    data = codec.encode("GenerationRequest", image_request())
    assert data[:2] == MARKER == b"\xc3\x01"
    assert data[2:HEADER_LEN] == codec.schema("GenerationRequest").fingerprint


@pytest.mark.parametrize("record", ["GenerationRequest", "Completion", "CancelRequest"])
def test_round_trip(codec: Codec, record: str):
    samples = {
        "GenerationRequest": image_request(
            kind="VIDEO",
            video={"num_frames": 16, "fps": 8, "prompt_end": "a fox at night", "seed_end": 9},
            labels={"trace": "x"},
            negative_prompt="blurry",
            seed=-5,
            deadline_ms=2**40,
            priority="HIGH",
            prompt="一只在雪地里的红狐狸 🦊",
        ),
        "Completion": {
            "request_id": "r",
            "tenant_id": "t",
            "status": "SUCCEEDED",
            "outputs": [
                {
                    "kind": "VIDEO",
                    "uri": "s3://b/k",
                    "presigned_url": "http://x",
                    "content_type": "video/mp4",
                    "bytes": 10,
                    "width": 64,
                    "height": 64,
                    "duration_ms": 2000,
                    "frames": 16,
                    "fps": 8,
                }
            ],
            "timings": {"queued_ms": 1, "render_ms": 2, "assemble_ms": 3, "total_ms": 6},
            "finished_at": 1,
        },
        "CancelRequest": {"request_id": "r", "tenant_id": "t", "reason": None, "requested_at": 5},
    }
    data = codec.encode(record, samples[record])
    name, decoded = codec.decode_any(data)
    assert name == record
    for key, value in samples[record].items():
        if key == "outputs":
            assert decoded[key][0]["frames"] == 16
        else:
            assert decoded[key] == value


def test_every_schema_field_is_documented():
    def fields(schema):
        if isinstance(schema, dict):
            if schema.get("type") == "record":
                for field in schema["fields"]:
                    yield schema["name"], field
                    yield from fields(field["type"])
            else:
                for value in schema.values():
                    yield from fields(value)
        elif isinstance(schema, list):
            for item in schema:
                yield from fields(item)

    undocumented = [
        f"{record}.{f['name']}"
        for path in SCHEMA_DIR.glob("*.avsc")
        for record, f in fields(json.loads(path.read_text()))
        if not f.get("doc")
    ]
    assert undocumented == []


def test_data_written_with_an_older_schema_is_read_with_the_new_one():
    """v0 of GenerationRequest had no scheduler, labels or deadline_ms; today's reader fills the defaults."""
    old_path = HISTORY / "generation_request.v0.avsc"
    old_schema = json.loads(old_path.read_text())
    old_writer = Codec(extra_history=[old_path])
    import fastavro

    body = bytearray(MARKER + schema_fingerprint(old_schema))
    import io

    buf = io.BytesIO()
    old_record = {k: v for k, v in image_request().items() if k in {f["name"] for f in old_schema["fields"]}}
    fastavro.schemaless_writer(buf, fastavro.parse_schema(old_schema), old_record)
    body += buf.getvalue()
    decoded = old_writer.decode(bytes(body), "GenerationRequest")
    assert decoded["prompt"] == "a red fox in snow"
    assert decoded["scheduler"] is None and decoded["labels"] == {} and decoded["deadline_ms"] is None
    # Without the history file the old fingerprint is unknown: a typed error, not a crash.
    with pytest.raises(DecodeError) as err:
        Codec().decode(bytes(body))
    assert err.value.code == "UNKNOWN_SCHEMA"


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda b: b"", "EMPTY"),
        (lambda b: b[:5], "TRUNCATED"),
        (lambda b: b"\x00\x01" + b[2:], "BAD_MARKER"),
        (lambda b: b[:2] + b"\xff" * 8 + b[10:], "UNKNOWN_SCHEMA"),
        (lambda b: b[:-3], "TRUNCATED"),
        (lambda b: b + b"\x00", "TRAILING_BYTES"),
        # a string of length -1
        (lambda b: b[:10] + b"\x01" * 3, "BAD_LENGTH"),
        # a string whose length prefix claims 2**62 bytes
        (lambda b: b[:10] + b"\xfe\xff\xff\xff\xff\xff\xff\xff\x7f" + b[10:], "BAD_LENGTH"),
        # invalid UTF-8 in the first string (request_id "req-1" -> bytes ff fe ...)
        (lambda b: b[:11] + b"\xff\xfe\xfd\xfc\xfb" + b[16:], "BAD_BODY"),
    ],
)
def test_malformed_bytes_raise_one_typed_error(codec: Codec, mutate, code: str):
    good = codec.encode("GenerationRequest", image_request())
    with pytest.raises(DecodeError) as err:
        codec.decode(mutate(good), "GenerationRequest")
    assert err.value.code == code


def test_wrong_record_is_rejected(codec: Codec):
    data = codec.encode("CancelRequest", {"request_id": "r", "tenant_id": "t", "requested_at": 1})
    with pytest.raises(DecodeError) as err:
        codec.decode(data, "GenerationRequest")
    assert err.value.code == "WRONG_SCHEMA"


def test_encode_rejects_records_that_do_not_fit(codec: Codec):
    with pytest.raises(EncodeError):
        codec.encode("GenerationRequest", {**image_request(), "width": "wide"})
    with pytest.raises(EncodeError):
        codec.encode("GenerationRequest", {**image_request(), "colour": "red"})
    with pytest.raises(EncodeError):
        codec.encode("NoSuchRecord", {})


def test_decode_error_is_permanent_and_names_no_other_type(codec: Codec):
    with pytest.raises(DecodeError) as err:
        codec.decode(struct.pack("<q", 1) * 3)
    assert err.value.kind.value == "permanent"
