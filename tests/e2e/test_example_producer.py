"""The example producer of docs/producing.md, run as another team would run it, against the running pipeline.

It runs as a subprocess from an empty folder with nothing but the Kafka address, the topic prefix and the
schema folder passed as arguments (no AIGC_* environment), so it works from the page alone.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path

from confluent_kafka import Producer

from infra.bootstrap import ensure_topics
from plumbing.clock import now_ms
from plumbing.kafka_clients import make_consumer
from plumbing.settings import Settings
from plumbing.topics import Topics, TopicSpec
from producers.contract import EXAMPLE, valid_request
from schemas.codec import SCHEMA_DIR, default_codec
from schemas.records import Completion
from stream_processors.assembler.video import decode_png

EXAMPLE_TIMEOUT_S = 150
RESULT_TIMEOUT_S = 120
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TENANT = "example-co"


def run_example(settings: Settings, cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, str(EXAMPLE), "a paper boat on a pond",
        "--bootstrap", settings.kafka.bootstrap_servers,
        "--topic-prefix", settings.kafka.topic_prefix,
        "--schemas", str(SCHEMA_DIR),
        "--tenant", TENANT, "--size", "64", "--steps", "4", "--timeout", str(RESULT_TIMEOUT_S),
        *extra,
    ]  # fmt: skip
    env = {"PATH": os.environ["PATH"]}  # no AIGC_* settings: only what the arguments say
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S, check=False
    )
    print(result.stdout, result.stderr)
    return result


def test_the_example_gets_a_succeeded_completion_whose_url_downloads_a_png(
    pipeline: Settings, tmp_path: Path
):
    result = run_example(pipeline, tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"completion SUCCEEDED on {Topics(pipeline).completions}" in out
    assert "status ACCEPTED (gatekeeper)" in out and "status QUEUED (gatekeeper)" in out
    # The pipeline continued the example's trace on the Completion (docs/producing.md, "Headers").
    trace = re.search(r"^trace ([0-9a-f]{32})$", out, re.M)
    assert trace is not None and f"(traceparent 00-{trace.group(1)}-" in out
    [url] = re.findall(r"^  (http\S+)$", out, re.M)
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = resp.read()
    assert body.startswith(PNG_SIGNATURE)
    assert decode_png(body).shape == (64, 64, 3)


def test_the_example_waits_on_its_tenants_reply_topic(pipeline: Settings, tmp_path: Path):
    topics = Topics(pipeline)
    reply = f"{topics.reply_prefix(TENANT)}.{uuid.uuid4().hex[:8]}"
    ensure_topics(pipeline, [TopicSpec(reply, "Completion", "request_id", 2)])
    result = run_example(pipeline, tmp_path, "--reply-topic", reply)
    assert result.returncode == 0, result.stderr
    assert f"completion SUCCEEDED on {reply}" in result.stdout
    assert re.search(r"^  http\S+$", result.stdout, re.M)


def test_the_example_refuses_a_reply_topic_that_does_not_exist(pipeline: Settings, tmp_path: Path):
    missing = f"{Topics(pipeline).reply_prefix(TENANT)}.missing{uuid.uuid4().hex[:8]}"
    result = run_example(pipeline, tmp_path, "--reply-topic", missing)
    assert result.returncode == 1
    assert f"topic {missing}" in result.stderr and "request " not in result.stdout  # nothing was sent


def test_a_request_without_headers_is_answered_with_the_pipelines_headers(pipeline: Settings):
    """Headers are optional for producers; the pipeline sets traceparent, request_id and tenant_id."""
    codec, topics = default_codec(), Topics(pipeline)
    request = replace(valid_request(), request_id=f"nohdr-{uuid.uuid4().hex[:12]}", tenant_id=TENANT,
                      width=64, height=64, steps=4, created_at=now_ms())  # fmt: skip
    producer = Producer({"bootstrap.servers": pipeline.kafka.bootstrap_servers})
    producer.produce(topics.requests("NORMAL"), codec.write(request), key=TENANT.encode())
    assert producer.flush(30) == 0
    consumer = make_consumer(pipeline, f"e2e-{uuid.uuid4().hex}", "e2e")
    consumer.subscribe([topics.completions])
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None or msg.error() or msg.key() != request.request_id.encode():
                continue
            headers = dict(msg.headers() or [])
            assert codec.read(msg.value(), Completion).status == "SUCCEEDED"
            assert headers["request_id"] == request.request_id.encode()
            assert headers["tenant_id"] == TENANT.encode()
            assert re.fullmatch(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", headers["traceparent"])
            return
    finally:
        consumer.close()
    raise AssertionError(f"no Completion for {request.request_id} within {RESULT_TIMEOUT_S} s")
