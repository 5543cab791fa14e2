"""docs/producing.md keeps to the code: its generated tables, its example producer and its claims about
what the gatekeeper answers, checked against the generator, the codec and `Gate.admit` themselves."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import struct
import sys
from dataclasses import replace
from types import ModuleType

import pytest

from plumbing.dead_letters import Original
from plumbing.settings import Settings
from producers import contract
from schemas.codec import HEADER_LEN, SCHEMA_DIR, default_codec
from schemas.records import Completion, DeadLetter, GenerationRequest, StatusEvent, Timings
from stream_processors.gatekeeper.admission import Gate
from stream_processors.gatekeeper.moderation import DEFAULT_POLICY_PATH, Moderator, Policy
from tests.unit.test_codec_strict import zigzag

codec = default_codec()


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_producer", contract.EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO as the Avro specification spells it, as an independent oracle for the fingerprint."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def test_the_generated_sections_of_the_doc_are_what_the_generator_prints():
    doc = contract.DOC.read_text(encoding="utf-8")
    assert contract.render(doc, contract.sections()) == doc, (
        f"docs/producing.md is out of date with the code; regenerate it with: {contract.REGENERATE}"
    )


def test_the_doc_shows_the_example_file_verbatim():
    doc = contract.DOC.read_text(encoding="utf-8")
    block = re.search(r"<!-- generated:example -->\n```python\n(.*?)```\n<!-- end:example -->", doc, re.S)
    assert block is not None, "docs/producing.md lost its example block"
    assert block.group(1) == contract.EXAMPLE.read_text(encoding="utf-8"), (
        f"the example in docs/producing.md differs from docs/example_producer.py; run {contract.REGENERATE}"
    )


def test_the_example_imports_only_the_standard_library_confluent_kafka_and_fastavro():
    tree = ast.parse(contract.EXAMPLE.read_text(encoding="utf-8"))
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}  # fmt: skip
    modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module}  # fmt: skip
    outside = modules - set(sys.stdlib_module_names) - {"confluent_kafka", "fastavro"}
    assert outside == set()


def test_the_example_writes_single_object_encoding_the_pipeline_reads():
    example = load_example()
    schemas = example.load_schemas(SCHEMA_DIR)
    request = contract.valid_request()
    data = example.encode(schemas, "GenerationRequest", request.to_avro())
    raw = json.loads((SCHEMA_DIR / "generation_request.avsc").read_text(encoding="utf-8"))
    from fastavro.schema import to_parsing_canonical_form

    canonical = to_parsing_canonical_form(raw).encode()
    assert data[:HEADER_LEN] == b"\xc3\x01" + struct.pack("<Q", crc64_avro(canonical))
    assert codec.read(data, GenerationRequest) == request


def test_the_example_reads_what_the_pipeline_writes():
    example = load_example()
    schemas = example.load_schemas(SCHEMA_DIR)
    completion = Completion(
        request_id="r-0001", tenant_id="acme", status="REJECTED", reason_code="RATE_LIMITED",
        message="retry later", retry_after_ms=50, timings=Timings(total_ms=3), labels={"a": "b"},
        created_at=1, finished_at=4,
    )  # fmt: skip
    name, record = example.decode(schemas, codec.write(completion))
    assert name == "Completion"
    assert record == completion.to_avro()
    assert example.decode(schemas, b"\xc3\x01" + bytes(8) + b"\x00") is None  # a schema it lacks


def gate() -> Gate:
    return Gate(Settings.model_construct(), codec, Moderator(Policy.from_file(DEFAULT_POLICY_PATH)))


def admit(value: bytes | None, offset: int = 0):
    original = Original("aigc.requests.normal", 0, offset, contract.NOW_MS, b"acme", value, [])
    return gate().admit(original, {}, {}, contract.NOW_MS)


def test_each_rule_in_the_doc_is_what_the_gatekeeper_answers_a_producer():
    """The rejections table comes from `validate_request`; the producer hears from `Gate.admit`: the two
    must agree on the status, the reason code and the message, case by case."""
    violations = contract.rule_violations(Settings.model_construct())
    assert len(violations) >= 20
    for what, exc in violations:
        request = dict(contract._rule_cases(Settings.model_construct().limits))[what](
            contract.valid_request()
        )
        admission = admit(codec.write(request))
        assert admission.verdict == "REJECTED", what
        [decision] = admission.outputs
        completion = codec.read(decision.value, Completion)
        assert (completion.reason_code, completion.message) == (exc.code, str(exc)), what


def test_the_valid_base_request_is_accepted():
    assert admit(codec.write(contract.valid_request())).verdict == "ACCEPTED"


def _strict_bytes(code: str) -> bytes:
    """A GenerationRequest that fastavro alone would read, broken the way the strict pass names ``code``."""
    request = replace(contract.valid_request(), prompt="PPPP", labels={"a": "1", "b": "2"})
    data = codec.write(request)
    prompt = data.index(zigzag(4) + b"PPPP")  # the prompt's length, then its bytes
    after_prompt = prompt + 5  # negative_prompt's union index (null)
    model = after_prompt + 1
    width = model + 1 + len(request.model)
    labels = zigzag(2) + b"".join(zigzag(1) + c.encode() for c in "a1b2") + b"\x00"
    split = zigzag(1) + b"\x02a\x021" + zigzag(1) + b"\x02b\x022\x00"
    patches = {
        "BAD_BODY": (data.index(b"PPPP"), 4, b"\xff\xfe\xff\xfe"),  # invalid UTF-8
        "BAD_ENUM_INDEX": (HEADER_LEN + 2 + 6 + 1 + 4, 1, zigzag(-1)),  # priority after two strings
        "BAD_UNION_INDEX": (after_prompt, 1, zigzag(-1)),
        "BAD_VARINT": (after_prompt, 1, b"\x80" * 10 + b"\x00"),
        "INT_OUT_OF_RANGE": (width, len(zigzag(request.width)), zigzag(2**40)),
        "BAD_LENGTH": (prompt, 1, zigzag(10_000)),
        "NON_CANONICAL": (data.index(labels), len(labels), split),
        "DUPLICATE_KEY": (data.index(labels), len(labels), labels.replace(b"\x02b", b"\x02a")),
    }
    at, length, replacement = patches[code]
    return data[:at] + replacement + data[at + length :]


def _bad_bytes(code: str) -> bytes:
    valid = codec.write(contract.valid_request())
    if code in STRICT_CODES:
        return _strict_bytes(code)
    status = codec.write(
        StatusEvent(request_id="r", tenant_id="t", stage="gatekeeper", state="ACCEPTED", at=1)
    )
    return {
        "EMPTY": b"",
        "TRUNCATED": valid[:5],
        "BAD_MARKER": b"\x00\x00" + valid[2:],
        "UNKNOWN_SCHEMA": valid[:2] + bytes(8) + valid[HEADER_LEN:],
        "WRONG_SCHEMA": status,
        "TRAILING_BYTES": valid + b"\x00",
        "INVALID_REQUEST_ID": codec.write(replace(contract.valid_request(), request_id="a b")),
    }[code]


STRICT_CODES = {"BAD_BODY", "BAD_ENUM_INDEX", "BAD_UNION_INDEX", "BAD_VARINT", "INT_OUT_OF_RANGE",
                "BAD_LENGTH", "NON_CANONICAL", "DUPLICATE_KEY"}  # fmt: skip
NO_BOOLEAN_IN_REQUESTS = "BAD_BOOLEAN"  # GenerationRequest has no boolean field to break


@pytest.mark.parametrize("code", sorted(set(contract._DEAD_LETTER_HELP) - {NO_BOOLEAN_IN_REQUESTS}))
def test_each_described_dead_letter_code_is_what_the_gatekeeper_dead_letters(code: str):
    admission = admit(_bad_bytes(code))
    assert (admission.verdict, admission.reason) == ("DEAD_LETTERED", code)
    [letter] = admission.outputs
    assert letter.topic == "aigc.dlq.gatekeeper"
    assert codec.read(letter.value, DeadLetter).value == _bad_bytes(code)
    assert contract._DEAD_LETTER_HELP[code] in contract.dead_letters_table()


def test_every_gatekeeper_decision_is_described():
    decisions = contract._decisions()
    undescribed = [reason for _, reason, _ in decisions if reason not in contract._DECISION_HELP]
    assert undescribed == [], f"describe these reason codes in producers/contract.py: {undescribed}"
    assert {"RATE_LIMITED", "OVERLOADED", "TENANT_BUSY", "MODERATED"} <= {r for _, r, _ in decisions}
