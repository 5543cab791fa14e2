"""Ask aigc-pipeline for one image and wait for it: a complete producer in plain confluent-kafka + fastavro.

Written from the .avsc files alone (no project code), as another team's service would be. It encodes a
GenerationRequest with Avro single-object encoding, produces it to the request topic of its priority
keyed by tenant_id, follows the status topic and waits for the request's Completion on the completions
topic (or on the tenant's reply topic with --reply-topic), then prints each output's presigned URL.

    python docs/example_producer.py --schemas schemas --tenant acme "a lighthouse at dusk"

Exit status: 0 when the request SUCCEEDED, 1 when it ended otherwise or no Completion came in time.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import fastavro
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from fastavro.schema import fingerprint, to_parsing_canonical_form

MARKER = b"\xc3\x01"  # Avro single-object encoding, format version 1
HEADER_LEN = 10  # the marker and the 8-byte fingerprint
LOOKBACK_MS = 60_000  # read results from this long before sending: room for clock skew between hosts


def load_schemas(folder: Path) -> dict[str, tuple[bytes, Any]]:
    """Record name -> (fingerprint, parsed schema) for every .avsc file in ``folder``."""
    schemas = {}
    for path in sorted(folder.glob("*.avsc")):
        raw = json.loads(path.read_text(encoding="utf-8"))
        # CRC-64-AVRO of the schema's parsing canonical form; fastavro's hex is the little-endian bytes.
        fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(raw), "CRC-64-AVRO"))
        schemas[raw["name"]] = (fp, fastavro.parse_schema(raw))
    return schemas


def encode(schemas: dict[str, tuple[bytes, Any]], record: str, datum: dict[str, Any]) -> bytes:
    """``C3 01``, the writer schema's fingerprint, then the Avro binary body."""
    fp, schema = schemas[record]
    body = io.BytesIO()
    fastavro.schemaless_writer(body, schema, datum)
    return MARKER + fp + body.getvalue()


def decode(schemas: dict[str, tuple[bytes, Any]], data: bytes | None) -> tuple[str, dict[str, Any]] | None:
    """(record name, datum), or None for bytes written with a schema this program does not have."""
    if not data or len(data) < HEADER_LEN or data[:2] != MARKER:
        return None
    for name, (fp, schema) in schemas.items():
        if data[2:HEADER_LEN] == fp:
            return name, fastavro.schemaless_reader(io.BytesIO(data[HEADER_LEN:]), schema)
    say(f"skipped a record of unknown schema {data[2:HEADER_LEN].hex()}: add the newer .avsc", sys.stderr)
    return None


def say(line: str, stream: Any = sys.stdout) -> None:
    """Print one line at once (the caller may be a pipe)."""
    stream.write(line + "\n")
    stream.flush()


def follow_from(consumer: Consumer, topics: list[str], since_ms: int) -> None:
    """Assign every partition of ``topics`` at the first offset written at or after ``since_ms``."""
    wanted = []
    for topic in topics:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        if meta.error is not None:
            raise SystemExit(f"topic {topic}: {meta.error.str()} (a reply topic must be created first)")
        wanted += [TopicPartition(topic, p, since_ms) for p in meta.partitions]
    start = consumer.offsets_for_times(wanted, timeout=10)
    for tp in start:
        if tp.offset < 0:  # nothing written since then: start at today's end, fixed before we send
            tp.offset = consumer.get_watermark_offsets(tp, timeout=10)[1]
    consumer.assign(start)


def main() -> int:
    """Submit one request, wait for its Completion, download the result; the exit status says how."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", nargs="?", default="a lighthouse at dusk, oil painting")
    parser.add_argument("--bootstrap", default="127.0.0.1:19092", help="Kafka bootstrap servers")
    parser.add_argument("--topic-prefix", default="aigc", help="first segment of the pipeline's topics")
    parser.add_argument("--schemas", type=Path, default=Path("schemas"), help="folder of the .avsc files")
    parser.add_argument("--tenant", default="acme")
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--size", type=int, default=256, help="width and height in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reply-topic", help="wait here instead of on the completions topic")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the result")
    args = parser.parse_args()

    schemas = load_schemas(args.schemas)
    now = int(time.time() * 1000)
    request = {
        "request_id": uuid.uuid4().hex,  # your idempotency key: reuse it only to resend the same request
        "tenant_id": args.tenant,
        "priority": "NORMAL",
        "kind": "IMAGE",
        "prompt": args.prompt,
        "negative_prompt": None,
        "model": args.model,
        "width": args.size,
        "height": args.size,
        "steps": args.steps,
        "guidance_scale": 7.5,
        "seed": None,
        "num_images": 1,
        "video": None,
        "output_format": "PNG",
        "scheduler": None,
        "reply_topic": args.reply_topic,
        "deadline_ms": now + int(args.timeout * 1000),  # no use to us later: it ends EXPIRED instead
        "labels": {"sent-by": "docs/example_producer.py"},
        "created_at": now,
        "webhook_url": None,  # or an https URL that receives the Completion, signed (README: Webhooks)
    }
    value = encode(schemas, "GenerationRequest", request)
    results = args.reply_topic or f"{args.topic_prefix}.completions"
    status = f"{args.topic_prefix}.status"

    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": f"example-{uuid.uuid4().hex}",  # required by the client; no offsets are committed
            "enable.auto.commit": False,
            "isolation.level": "read_committed",  # Completions are written in transactions: skip aborted ones
        }
    )
    try:
        follow_from(consumer, [results, status], now - LOOKBACK_MS)

        trace_id = f"{random.getrandbits(128):032x}"
        producer = Producer({"bootstrap.servers": args.bootstrap, "enable.idempotence": True})
        delivered: list[tuple[Any, Any]] = []  # (error, message) from the broker's acknowledgement
        producer.produce(
            f"{args.topic_prefix}.requests.{request['priority'].lower()}",
            value,
            key=request["tenant_id"].encode(),
            headers=[  # optional: the pipeline continues your trace when you send a traceparent
                ("traceparent", f"00-{trace_id}-{random.getrandbits(64):016x}-01".encode()),
                ("request_id", request["request_id"].encode()),
                ("tenant_id", request["tenant_id"].encode()),
            ],
            on_delivery=lambda err, msg: delivered.append((err, msg)),
        )
        producer.flush(30)
        if not delivered or delivered[0][0] is not None:
            say(f"request not acknowledged: {delivered[0][0] if delivered else 'timed out'}", sys.stderr)
            return 1
        ack = delivered[0][1]
        say(f"request {request['request_id']} on {ack.topic()}:{ack.partition()}@{ack.offset()}")
        say(f"trace {trace_id}")

        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                raise KafkaException(msg.error())
            decoded = decode(schemas, msg.value())
            if decoded is None or decoded[1]["request_id"] != request["request_id"]:
                continue
            name, record = decoded
            if name == "StatusEvent":
                say(f"status {record['state']} ({record['stage']})")
            elif name == "Completion" and msg.topic() == results:
                return report(record, msg)
        say(f"no Completion within {args.timeout:g} s", sys.stderr)
        return 1
    finally:
        consumer.close()


def report(completion: dict[str, Any], msg: Any) -> int:
    """Print a Completion: its status, the headers the pipeline set, and each output's URL."""
    headers = {k: (v or b"").decode() for k, v in msg.headers() or []}
    say(f"completion {completion['status']} on {msg.topic()} (traceparent {headers.get('traceparent')})")
    if completion["status"] != "SUCCEEDED":
        say(f"reason {completion['reason_code']}: {completion['message']}")
        if completion["retry_after_ms"] is not None:
            say(f"retry after {completion['retry_after_ms']} ms")
        return 1
    for output in completion["outputs"]:
        say(f"{output['content_type']} {output['width']}x{output['height']}, {output['bytes']} bytes:")
        say(f"  {output['presigned_url']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
