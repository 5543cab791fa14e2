"""A strict pass over an Avro binary body: the bytes must be the one canonical encoding of some datum.

fastavro's reader trusts its input. It indexes an enum's symbols and a union's branches with whatever
index the bytes hold, so a negative index wraps to the last symbol or branch (Python's negative
indexing: zigzag -1 for ``priority`` decodes as LOW, and -1 on a ``["null", "long"]`` union reads the
long); it reads a varint of any length and wraps it to 64 bits; it does not check that an ``int`` fits
32 bits; and it allocates an array's items before it finds out that the bytes cannot hold them. The
same class of bug was fixed in Apache Avro's own Python, Ruby and C decoders.

`compile_check` turns a parsed writer schema into a function that walks a body before fastavro reads
it and raises `plumbing.errors.DecodeError` at the first byte that is not canonical, naming the field:

- ``BAD_ENUM_INDEX`` / ``BAD_UNION_INDEX``: an index below 0 or past the last symbol or branch;
- ``BAD_VARINT``: a varint longer than 10 bytes, past 64 bits, or not in its shortest form;
- ``INT_OUT_OF_RANGE``: an ``int`` outside -2**31 .. 2**31-1;
- ``BAD_LENGTH``: a negative length of bytes or a string, a length past the remaining bytes, a negative
  block count (a block with a byte size: fastavro and Java's usual writer never write one) or a block
  count larger than the remaining bytes;
- ``NON_CANONICAL``: an array or map written in more than one block;
- ``DUPLICATE_KEY``: a map key written twice (the datum would keep only the last);
- ``BAD_BOOLEAN``: a boolean byte that is not 0 or 1;
- ``TRUNCATED``: the body ends inside a value.

What passes re-encodes to the same bytes (`tests/unit/test_codec_strict.py` proves it by mutating
valid encodings); what fastavro itself still rejects (text that is not UTF-8) stays ``BAD_BODY``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from schemas.errors import DecodeError

# ``check(data, pos) -> pos after the value``; raises DecodeError.
Check = Callable[[bytes, int], int]

INT_ZIGZAG_LIMIT = 1 << 32  # zigzag of -2**31 .. 2**31-1 is 0 .. 2**32-1
LONG_ZIGZAG_LIMIT = 1 << 64
FIXED_SIZES = {"float": 4, "double": 8}


def _varint(data: bytes, pos: int, where: str, limit: int = LONG_ZIGZAG_LIMIT) -> tuple[int, int]:
    """The zigzag-decoded varint at ``pos`` and the position after it; only the shortest form passes."""
    if pos >= len(data):
        raise DecodeError(f"{where}: the body ends where a number starts", code="TRUNCATED")
    byte = data[pos]
    if byte < 0x80:  # the common case: one byte
        return (byte >> 1) ^ -(byte & 1), pos + 1
    start, raw, shift = pos, 0, 0
    while byte & 0x80:
        raw |= (byte & 0x7F) << shift
        shift += 7
        pos += 1
        if pos - start >= 10:
            raise DecodeError(f"{where}: varint longer than 10 bytes", code="BAD_VARINT")
        if pos >= len(data):
            raise DecodeError(f"{where}: the body ends inside a number", code="TRUNCATED")
        byte = data[pos]
    raw |= byte << shift
    if byte == 0:
        raise DecodeError(f"{where}: varint not in its shortest form", code="BAD_VARINT")
    if raw >= LONG_ZIGZAG_LIMIT:
        raise DecodeError(f"{where}: varint past 64 bits", code="BAD_VARINT")
    if raw >= limit:
        value = (raw >> 1) ^ -(raw & 1)
        raise DecodeError(f"{where}: {value} does not fit an int", code="INT_OUT_OF_RANGE")
    return (raw >> 1) ^ -(raw & 1), pos + 1


def _length(data: bytes, pos: int, where: str) -> tuple[int, int]:
    size, pos = _varint(data, pos, where)
    if size < 0 or size > len(data) - pos:
        raise DecodeError(f"{where}: length {size} with {len(data) - pos} bytes left", code="BAD_LENGTH")
    return size, pos


def _sized(size: int, where: str) -> Check:
    def check(data: bytes, pos: int) -> int:
        if pos + size > len(data):
            raise DecodeError(f"{where}: the body ends inside a {size}-byte value", code="TRUNCATED")
        return pos + size

    return check


def _blocks(item: Check, where: str, keyed: bool) -> Check:
    """An array (``keyed`` False) or a map: one block of items, then the count 0."""

    def check(data: bytes, pos: int) -> int:
        count, pos = _varint(data, pos, where)
        if count == 0:
            return pos
        if count < 0 or count > len(data) - pos:
            raise DecodeError(
                f"{where}: block count {count} with {len(data) - pos} bytes left", code="BAD_LENGTH"
            )
        keys: set[bytes] = set()
        for _ in range(count):
            if keyed:
                size, start = _length(data, pos, where)
                pos = start + size
                key = data[start:pos]
                if key in keys:
                    raise DecodeError(f"{where}: key {key[:40]!r} written twice", code="DUPLICATE_KEY")
                keys.add(key)
            pos = item(data, pos)
        end, pos = _varint(data, pos, where)
        if end != 0:
            raise DecodeError(f"{where}: more than one block", code="NON_CANONICAL")
        return pos

    return check


def compile_check(schema: Any) -> Check:
    """The strict check of ``schema`` (fastavro's parsed form or JSON-shaped), compiled once."""
    names: dict[str, Check] = {}
    where = str(schema.get("name", schema["type"]) if isinstance(schema, dict) else schema).rpartition(".")[2]
    return _compile(schema, names, where, "")


def _compile(schema: Any, names: dict[str, Check], where: str, namespace: str) -> Check:
    if isinstance(schema, list):
        return _union([_compile(b, names, where, namespace) for b in schema], where)
    kind = schema if isinstance(schema, str) else schema["type"]
    primitive = _primitive(kind, where)
    if primitive is not None:
        return primitive
    if isinstance(schema, str):  # a named type defined earlier (or enclosing: records register first)
        full = schema if "." in schema or not namespace else f"{namespace}.{schema}"
        return names[full if full in names else schema]
    if kind == "array":
        return _blocks(_compile(schema["items"], names, f"{where}[]", namespace), where, keyed=False)
    if kind == "map":
        return _blocks(_compile(schema["values"], names, f"{where}{{}}", namespace), where, keyed=True)
    return _named(schema, kind, names, where, namespace)


def _union(branches: list[Check], where: str) -> Check:
    def union(data: bytes, pos: int) -> int:
        index, pos = _varint(data, pos, where)
        if not 0 <= index < len(branches):
            raise DecodeError(
                f"{where}: union branch {index} is not in 0..{len(branches) - 1}",
                code="BAD_UNION_INDEX",
            )
        return branches[index](data, pos)

    return union


def _primitive(kind: str, where: str) -> Check | None:
    """The check of a primitive type; None for any other."""
    if kind == "null":
        return lambda data, pos: pos
    if kind in ("int", "long"):
        limit = INT_ZIGZAG_LIMIT if kind == "int" else LONG_ZIGZAG_LIMIT
        return lambda data, pos: _varint(data, pos, where, limit)[1]
    if kind == "boolean":

        def boolean(data: bytes, pos: int) -> int:
            if pos >= len(data):
                raise DecodeError(f"{where}: the body ends where a boolean starts", code="TRUNCATED")
            if data[pos] > 1:
                raise DecodeError(f"{where}: boolean byte {data[pos]}", code="BAD_BOOLEAN")
            return pos + 1

        return boolean
    if kind in FIXED_SIZES:
        return _sized(FIXED_SIZES[kind], where)
    if kind in ("bytes", "string"):

        def text(data: bytes, pos: int) -> int:
            size, pos = _length(data, pos, where)
            return pos + size

        return text
    return None


def _named(schema: dict[str, Any], kind: str, names: dict[str, Check], where: str, namespace: str) -> Check:
    """The check of an enum, fixed or record definition, registered under its full and short names."""
    name = schema["name"]
    namespace = schema.get("namespace", name.rpartition(".")[0] or namespace)
    full = name if "." in name or not namespace else f"{namespace}.{name}"
    if kind == "enum":
        symbols = len(schema["symbols"])

        def enum(data: bytes, pos: int) -> int:
            index, pos = _varint(data, pos, where, INT_ZIGZAG_LIMIT)
            if not 0 <= index < symbols:
                raise DecodeError(
                    f"{where}: enum index {index} is not in 0..{symbols - 1}", code="BAD_ENUM_INDEX"
                )
            return pos

        check: Check = enum
    elif kind == "fixed":
        check = _sized(schema["size"], where)
    elif kind == "record":
        fields: list[Check] = []

        def record(data: bytes, pos: int) -> int:
            for field in fields:
                pos = field(data, pos)
            return pos

        check = record
        names[full] = names[full.rpartition(".")[2]] = check  # before the fields: they may recurse
        fields.extend(_compile(f["type"], names, f"{where}.{f['name']}", namespace) for f in schema["fields"])
    else:
        raise ValueError(f"{where}: unsupported Avro type {kind!r}")
    names[full] = names[full.rpartition(".")[2]] = check
    return check
