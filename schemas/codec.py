"""Avro single-object encoding against the schemas in this folder.

A message is ``C3 01`` (the marker), the 8-byte little-endian CRC-64-AVRO fingerprint of the writer
schema's parsing canonical form, then the Avro binary body. The codec knows every current schema
(``schemas/*.avsc``) and every earlier version (``schemas/history/*.avsc``), so a reader finds the writer
schema by fingerprint and resolves it to the current schema of the same record: data written by an older
producer is read with today's fields, new ones taking their defaults.

Decoding is strict: before fastavro reads a body, `schemas.canonical` walks it with the writer schema and
rejects anything that is not the canonical Avro encoding of some datum (a negative or out-of-range enum
or union index, a varint past 64 bits or not in its shortest form, an ``int`` past 32 bits, a length
or block count that is negative or past the remaining bytes, ...), so what decodes re-encodes to the
same bytes.

Errors: `decode` raises `plumbing.errors.DecodeError` and nothing else, whatever the bytes; its ``code``
says what was wrong: one of `DECODE_CODES`. `encode` raises `plumbing.errors.EncodeError` for a record
that does not fit its schema.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from schemas.canonical import Check, compile_check
from schemas.errors import DecodeError, EncodeError
from schemas.records import RECORDS, Record

R = TypeVar("R", bound=Record)
MARKER = b"\xc3\x01"
HEADER_LEN = len(MARKER) + 8
SCHEMA_DIR = Path(__file__).resolve().parent
# Every code `Codec.decode` may raise: the framing's, fastavro's (BAD_BODY) and the strict pass's.
DECODE_CODES = frozenset(
    {
        "EMPTY",
        "TRUNCATED",
        "BAD_MARKER",
        "UNKNOWN_SCHEMA",
        "WRONG_SCHEMA",
        "BAD_BODY",
        "TRAILING_BYTES",
        "BAD_ENUM_INDEX",
        "BAD_UNION_INDEX",
        "BAD_VARINT",
        "INT_OUT_OF_RANGE",
        "BAD_LENGTH",
        "NON_CANONICAL",
        "DUPLICATE_KEY",
        "BAD_BOOLEAN",
    }
)


@dataclass(frozen=True)
class SchemaVersion:
    """One version of a record's schema: its name, fingerprint, parsed form, file, whether it is the current
    one, and its strict check.
    """

    record: str  # short record name, e.g. "GenerationRequest"
    fingerprint: bytes  # 8 bytes, little-endian CRC-64-AVRO
    parsed: Any  # fastavro's parsed form
    source: Path
    current: bool
    check: Check  # the strict pass over a body written with this schema


def schema_fingerprint(schema: Any) -> bytes:
    """The 8-byte CRC-64-AVRO fingerprint of a schema (JSON-shaped), as it appears in the message header."""
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


def _load(path: Path, current: bool) -> SchemaVersion:
    raw = json.loads(path.read_text(encoding="utf-8"))
    return SchemaVersion(
        record=raw["name"],
        fingerprint=schema_fingerprint(raw),
        parsed=fastavro.parse_schema(raw),
        source=path,
        current=current,
        check=compile_check(raw),
    )


class Codec:
    """Encodes and decodes the pipeline's records; one instance serves a whole process."""

    def __init__(self, schema_dir: Path = SCHEMA_DIR, extra_history: Iterable[Path] = ()) -> None:
        self._current: dict[str, SchemaVersion] = {}
        self._by_fingerprint: dict[bytes, SchemaVersion] = {}
        for path in sorted(schema_dir.glob("*.avsc")):
            version = _load(path, current=True)
            if version.record in self._current:
                raise ValueError(f"{path}: record {version.record} is defined twice")
            self._current[version.record] = version
            self._by_fingerprint[version.fingerprint] = version
        for path in [*sorted((schema_dir / "history").glob("*.avsc")), *extra_history]:
            version = _load(path, current=False)
            if version.record not in self._current:
                raise ValueError(f"{path}: history of unknown record {version.record}")
            self._by_fingerprint.setdefault(version.fingerprint, version)

    @property
    def records(self) -> tuple[str, ...]:
        """The names of the records this codec writes, sorted."""
        return tuple(sorted(self._current))

    def schema(self, record: str) -> SchemaVersion:
        """The current schema of ``record``."""
        return self._current[record]

    def write(self, record: Record) -> bytes:
        """Single-object encoding of a typed record (`schemas.records`) with its current schema."""
        return self.encode(record.SCHEMA, record.to_avro())

    def read(self, data: bytes | None, cls: type[R]) -> R:
        """The ``cls`` record in ``data``; `DecodeError` (WRONG_SCHEMA) when the bytes hold another record."""
        datum = self.decode(data, cls.SCHEMA)
        try:
            return cls.from_avro(datum)
        except (KeyError, TypeError) as exc:  # a test's own schema folder may differ from the classes
            raise DecodeError(f"{cls.SCHEMA}: {exc}", code="WRONG_SCHEMA") from exc

    def read_any(self, data: bytes | None) -> Record:
        """Whatever top-level record ``data`` holds, typed."""
        name, datum = self.decode_any(data)
        return RECORDS[name].from_avro(datum)

    def encode(self, record: str, datum: Mapping[str, Any]) -> bytes:
        """Single-object encoding of ``datum`` with the current schema of ``record``."""
        version = self._current.get(record)
        if version is None:
            raise EncodeError(f"no schema for record {record!r}")
        buf = io.BytesIO()
        buf.write(MARKER)
        buf.write(version.fingerprint)
        try:
            fastavro.schemaless_writer(buf, version.parsed, dict(datum), strict_allow_default=True)
        except Exception as exc:  # fastavro raises ValueError, TypeError, AttributeError...
            raise EncodeError(f"{record}: {exc}") from exc
        return buf.getvalue()

    def decode(self, data: bytes | None, expect: str | None = None) -> dict[str, Any]:
        """The record in ``data``, resolved to the current schema; ``expect`` names the record required."""
        return self.decode_any(data, expect)[1]

    def decode_any(self, data: bytes | None, expect: str | None = None) -> tuple[str, dict[str, Any]]:
        """(record name, datum) of ``data``, the datum in fastavro's dict shape; tools that must handle
        any bytes (the dead-letter and poison tooling) read this way, stages use `read`."""
        if not data:
            raise DecodeError("empty message", code="EMPTY")
        if len(data) < HEADER_LEN:
            raise DecodeError(
                f"{len(data)} bytes is shorter than the {HEADER_LEN}-byte header", code="TRUNCATED"
            )
        if data[:2] != MARKER:
            raise DecodeError(f"marker {data[:2].hex()} is not c301 (Avro single-object)", code="BAD_MARKER")
        writer = self._by_fingerprint.get(bytes(data[2:HEADER_LEN]))
        if writer is None:
            raise DecodeError(f"unknown schema fingerprint {data[2:HEADER_LEN].hex()}", code="UNKNOWN_SCHEMA")
        if expect is not None and writer.record != expect:
            raise DecodeError(f"expected {expect}, got {writer.record}", code="WRONG_SCHEMA")
        reader = self._current[writer.record]
        data = bytes(data)
        end = writer.check(data, HEADER_LEN)
        if end != len(data):
            raise DecodeError(
                f"{writer.record}: {len(data) - end} bytes after the record", code="TRAILING_BYTES"
            )
        body = io.BytesIO(data)
        body.seek(HEADER_LEN)
        try:
            record = fastavro.schemaless_reader(
                body, writer.parsed, None if writer is reader else reader.parsed
            )
        except Exception as exc:  # the one decode boundary: EOFError, UnicodeDecodeError, ValueError, ...
            raise DecodeError(
                f"{writer.record}: malformed body ({type(exc).__name__}: {exc})"[:500], code="BAD_BODY"
            ) from exc
        if body.tell() != len(data):  # the strict pass agrees with fastavro on where a record ends
            raise DecodeError(
                f"{writer.record}: {len(data) - body.tell()} bytes after the record", code="TRAILING_BYTES"
            )
        if not isinstance(record, dict):
            raise DecodeError(f"{writer.record}: body is not a record", code="BAD_BODY")
        return writer.record, record


@cache
def default_codec() -> Codec:
    """The process-wide codec over the schemas shipped with the package."""
    return Codec()
