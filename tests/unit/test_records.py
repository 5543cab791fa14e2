"""The typed records (`schemas.records`) match the .avsc files and round-trip through the codec."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from mypy import api as mypy_api

from schemas import generate
from schemas.codec import SCHEMA_DIR, default_codec
from schemas.errors import DecodeError
from schemas.records import RECORDS, Completion, GenerationRequest, StatusEvent

REPO = Path(__file__).resolve().parents[2]


def _sample(avro: Any, named: dict[str, Any], depth: int = 0) -> Any:
    """A valid datum of an Avro type, with a non-default value wherever one can be told apart."""
    if isinstance(avro, list):  # ["null", X]: the non-null branch, so nested records are exercised
        return _sample(next(b for b in avro if b != "null"), named, depth)
    if isinstance(avro, str):
        if avro in named:
            return _sample(named[avro], named, depth)
        return {
            "string": f"s{depth}",
            "long": 2**40 + depth,
            "int": 7 + depth,
            "double": 1.5,
            "float": 0.5,
            "boolean": True,
            "bytes": b"\x00\xff",
            "null": None,
        }[avro]
    kind = avro["type"]
    if kind == "record":
        named[avro["name"]] = avro
        return {f["name"]: _sample(f["type"], named, depth + 1) for f in avro["fields"]}
    if kind == "enum":
        named[avro["name"]] = avro
        return avro["symbols"][-1]
    if kind == "array":
        return [_sample(avro["items"], named, depth + 1) for _ in range(2)]
    if kind == "map":
        return {"k": _sample(avro["values"], named, depth + 1)}
    return _sample(kind, named, depth)


def test_generated_module_is_current() -> None:
    """`schemas/records.py` is what `python -m schemas.generate` writes from today's schemas."""
    assert (SCHEMA_DIR / "records.py").read_text(encoding="utf-8") == generate.render()


def test_one_class_per_schema_with_the_schemas_fields() -> None:
    codec = default_codec()
    assert set(RECORDS) == set(codec.records)
    for name, cls in RECORDS.items():
        schema = json.loads(codec.schema(name).source.read_text(encoding="utf-8"))
        assert [f.name for f in dataclasses.fields(cls)] == [f["name"] for f in schema["fields"]], name


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_every_record_round_trips_through_the_codec(name: str) -> None:
    codec = default_codec()
    schema = json.loads(codec.schema(name).source.read_text(encoding="utf-8"))
    datum = _sample(schema, {})
    data = codec.encode(name, datum)
    record = codec.read(data, RECORDS[name])
    assert isinstance(record, RECORDS[name])
    assert record.to_avro() == codec.decode(data)
    assert codec.write(record) == data
    assert codec.read_any(data) == record


def test_read_refuses_another_record() -> None:
    codec = default_codec()
    status = StatusEvent(request_id="r", tenant_id="t", stage="gatekeeper", state="QUEUED", at=1)
    with pytest.raises(DecodeError) as err:
        codec.read(codec.write(status), Completion)
    assert err.value.code == "WRONG_SCHEMA"


def test_defaults_are_the_schemas() -> None:
    """A record built with only its required fields encodes to what fastavro writes from the defaults."""
    codec = default_codec()
    request = GenerationRequest(
        request_id="r1",
        tenant_id="t1",
        kind="IMAGE",
        prompt="a cat",
        model="tiny",
        width=64,
        height=64,
        steps=2,
        guidance_scale=1.0,
        created_at=5,
    )
    assert request.priority == "NORMAL"
    assert request.labels == {} and request.num_images == 1 and request.video is None
    minimal = {k: v for k, v in request.to_avro().items() if k in {"request_id", "tenant_id", "kind"}}
    minimal |= {"prompt": "a cat", "model": "tiny", "width": 64, "height": 64, "steps": 2}
    minimal |= {"guidance_scale": 1.0, "created_at": 5}
    assert codec.encode("GenerationRequest", minimal) == codec.write(request)


def test_mypy_catches_a_misspelled_record_field(tmp_path: Path) -> None:
    """The point of the classes: a misspelled field fails the type check, not a run in production."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from schemas.codec import default_codec\n"
        "from schemas.records import GenerationRequest\n"
        "def prompt_of(data: bytes) -> str:\n"
        "    return default_codec().read(data, GenerationRequest).promtp\n",
        encoding="utf-8",
    )
    out, _, status = mypy_api.run(
        [str(probe), "--no-incremental", "--follow-imports=silent", "--ignore-missing-imports"]
    )
    assert status == 1, out
    assert '"GenerationRequest" has no attribute "promtp"' in out
