"""`aigc dlq` and the delivery checker on real Kafka, Cassandra and S3Proxy.

Dead letters are made the way stages make them: the original message is produced to its topic, then
`plumbing.retries.route_failure` turns the failure into the DeadLetter a stage would produce. Outcomes
(completions, terminal rows, stored objects) are written the way the sink writes them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from infra.bootstrap import ensure_schema
from plumbing.blobs import BlobStore, frame_key, result_prefix
from plumbing.clock import now_ms
from plumbing.dead_letters import Original
from plumbing.errors import DecodeError, PermanentError, RetryableError
from plumbing.headers import ATTEMPTS, FIRST_FAILED_AT, ORIGIN, REPLAYED_FROM, pipeline_headers
from plumbing.kafka_clients import header_list, make_consumer, make_producer, produce_sync, watermarks
from plumbing.metadata import connect
from plumbing.retries import route_failure
from plumbing.settings import Settings
from plumbing.topics import Stage, Topics
from producers.chaos import ChaosPlan, ChaosReport, _finished
from producers.checker import BoundedRead, check_delivery
from producers.dlq import Filters, count, format_entry, read_dead_letters, replay
from schemas.codec import default_codec
from schemas.records import Completion, GenerationRequest, Timings
from stream_processors.gatekeeper.fanout import plan_tasks
from tests.conftest import REPO, unique

HOUR_MS = 3600 * 1000


@pytest.fixture
def env(isolated: Settings) -> Iterator[Settings]:
    """The test's topics plus a keyspace of its own."""
    settings = isolated.model_copy(
        update={"cassandra": isolated.cassandra.model_copy(update={"keyspace": unique("ks")})}
    )
    ensure_schema(settings)
    yield settings
    cluster, session = connect(settings.cassandra)
    session.execute(f"DROP KEYSPACE IF EXISTS {settings.cassandra.keyspace}", timeout=60)
    cluster.shutdown()


class World:
    """Writes what stages write: originals, dead letters, completions, rows, objects."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings)
        self.codec = default_codec()
        self.producer = make_producer(settings, "test")
        self.cluster, self.session = connect(settings.cassandra)
        self.blobs = BlobStore(settings.s3)
        self.tenant = unique("tenant")

    def request(self, **fields: Any) -> GenerationRequest:
        base = dict(request_id=uuid.uuid4().hex, tenant_id=self.tenant, kind="IMAGE", model="tiny-sd")
        sizes = dict(width=64, height=64, steps=4, guidance_scale=7.0, created_at=now_ms())
        return GenerationRequest(**{**base, "prompt": "a lighthouse at dusk", **sizes, **fields})

    def publish(self, topic: str, value: bytes, key: bytes | None, headers: list) -> Original:
        msg = produce_sync(self.producer, topic, value, key=key, headers=headers)
        return Original(topic, msg.partition(), msg.offset(), msg.timestamp()[1], key, value, headers)

    def publish_request(self, request: GenerationRequest, extra_headers: list | None = None) -> Original:
        headers = pipeline_headers(
            request.request_id, request.tenant_id, "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
        )
        return self.publish(
            self.topics.requests(request.priority),
            self.codec.write(request),
            request.tenant_id.encode(),
            [*headers, *(extra_headers or [])],
        )

    def fail(
        self,
        stage: Stage,
        original: Original,
        exc: BaseException,
        at: int | None = None,
        request_id: str | None = None,
    ) -> str:
        """Dead-letter ``original`` as a stage does; the dead letter's coordinate."""
        tenant = self.tenant if request_id else None
        routed = route_failure(
            self.codec,
            self.topics,
            self.settings.retry,
            stage,
            original,
            exc,
            at or now_ms(),
            request_id,
            tenant,
        )
        assert routed is not None and routed.dead
        msg = produce_sync(self.producer, routed.topic, routed.value, key=routed.key, headers=routed.headers)
        return f"{msg.topic()}:{msg.partition()}:{msg.offset()}"

    def complete(self, request_id: str, status: str = "SUCCEEDED", finished_at: int | None = None) -> None:
        record = Completion(
            request_id=request_id,
            tenant_id=self.tenant,
            status=status,
            outputs=[],
            timings=Timings(queued_ms=1, render_ms=2, assemble_ms=3, total_ms=6),
            created_at=now_ms() - 1000,
            finished_at=now_ms() if finished_at is None else finished_at,
        )
        value = self.codec.write(record)
        produce_sync(self.producer, self.topics.completions, value, key=request_id.encode())

    def row(self, request_id: str, status: str = "SUCCEEDED", indexed: bool = False) -> None:
        ks = self.settings.cassandra.keyspace
        now = datetime.now(UTC)
        self.session.execute(
            f"INSERT INTO {ks}.requests (request_id, tenant_id, status, created_at, finished_at, decided_by) "
            "VALUES (%s, %s, %s, %s, %s, %s) IF NOT EXISTS",
            (request_id, self.tenant, status, now, now, "test:0:0"),
        )
        if indexed:
            self.session.execute(
                f"INSERT INTO {ks}.requests_by_tenant (tenant_id, month, created_at, request_id, status) "
                "VALUES (%s, %s, %s, %s, %s)",
                (self.tenant, f"{now:%Y-%m}", now, request_id, status),
            )

    def result(self, request_id: str) -> str:
        key = result_prefix(self.tenant, request_id, now_ms()) + "image-0.png"
        return self.blobs.put(self.settings.s3.results_bucket, key, b"\x89PNG fake", "image/png").uri

    def staged(self, request_id: str) -> str:
        key = frame_key(self.tenant, request_id, 0)
        return self.blobs.put(self.settings.s3.staging_bucket, key, b"\x89PNG frame", "image/png").uri

    def close(self) -> None:
        self.producer.flush(10)
        self.cluster.shutdown()


@pytest.fixture
def world(env: Settings) -> Iterator[World]:
    w = World(env)
    yield w
    w.close()


def high_watermarks(settings: Settings) -> dict[tuple[str, int], int]:
    consumer = make_consumer(settings, unique("g"), "test")
    try:
        names = [spec.name for spec in Topics(settings).all()]
        metadata = consumer.list_topics(timeout=10).topics
        return {
            (t, p): watermarks(consumer, TopicPartition(t, p))[1]
            for t in names
            for p in metadata[t].partitions
        }
    finally:
        consumer.close()


def messages(settings: Settings, topic: str) -> list:
    return list(BoundedRead(settings, [topic], timeout_s=20))


def poison(w: World) -> dict[str, Any]:
    """Five dead letters of four kinds, as the stages would have written them."""
    garbage = w.publish(w.topics.requests("NORMAL"), b"\x00garbage\xff" * 30, w.tenant.encode(), [])
    try:
        w.codec.read(garbage.value, GenerationRequest)
    except DecodeError as exc:
        decode_error = exc
    old = now_ms() - 2 * HOUR_MS
    exhausted_request = w.request(priority="HIGH")
    retried = w.publish_request(exhausted_request, [(ATTEMPTS, b"3"), (FIRST_FAILED_AT, str(old).encode())])
    retired_request = w.request(model="retired-model")  # valid then; the model has left the registry since
    retired = w.publish_request(retired_request, [(ATTEMPTS, b"3"), (FIRST_FAILED_AT, str(old).encode())])
    task_request = w.request()
    [task] = plan_tasks(task_request, "default", 4, now_ms(), now_ms())
    render = w.publish(
        w.topics.render("default", "NORMAL"),
        w.codec.write(task),
        task.request_id.encode(),
        pipeline_headers(task.request_id, w.tenant, "00-" + "c" * 32 + "-" + "d" * 16 + "-01"),
    )
    store_down = RetryableError("cassandra unavailable", code="STORE_UNAVAILABLE")
    coords = {
        "garbage": w.fail(Stage.GATEKEEPER, garbage, decode_error, at=old),
        "exhausted": w.fail(Stage.GATEKEEPER, retried, store_down, request_id=exhausted_request.request_id),
        "retired": w.fail(Stage.GATEKEEPER, retired, store_down, request_id=retired_request.request_id),
        # The renderer knows no ids when it fails: the tools find them in the original value.
        "render": w.fail(Stage.RENDERER, render, PermanentError("diffusers blew up", code="RENDER_FAILED")),
    }
    junk = produce_sync(w.producer, w.topics.dlq(Stage.ASSEMBLER), b"not a dead letter", key=b"k")
    coords["junk"] = f"{junk.topic()}:{junk.partition()}:{junk.offset()}"
    return {
        "coords": coords,
        "originals": {"exhausted": retried, "render": render, "garbage": garbage},
        "ids": {
            "exhausted": exhausted_request.request_id,
            "retired": retired_request.request_id,
            "render": task_request.request_id,
        },
        "old": old,
    }


# -- dlq ls and show ------------------------------------------------------------------------------------
def test_ls_counts_by_stage_kind_and_code(world: World):
    poison(world)
    counts = count(read_dead_letters(world.settings, Filters()))
    assert counts.total == 5
    assert counts.not_dead_letters == 1
    assert counts.by_stage_kind == {
        ("gatekeeper", "permanent"): 1,
        ("gatekeeper", "retryable"): 2,
        ("renderer", "permanent"): 1,
        ("assembler", "(undecodable)"): 1,
    }
    assert counts.by_code == {"BAD_MARKER": 1, "STORE_UNAVAILABLE": 2, "RENDER_FAILED": 1, "(undecodable)": 1}
    text = counts.format()
    assert "dead letters: 5 (1 not decodable as DeadLetter)" in text
    assert "STORE_UNAVAILABLE" in text and "gatekeeper" in text


def test_show_decodes_a_decodable_original_and_previews_an_undecodable_one(world: World):
    p = poison(world)
    entries = {e.coordinate: e for e in read_dead_letters(world.settings, Filters())}
    exhausted = format_entry(entries[p["coords"]["exhausted"]], world.codec)
    original = p["originals"]["exhausted"]
    assert f"original: {original.topic}:{original.partition}:{original.offset}" in exhausted
    assert "retryable STORE_UNAVAILABLE  attempts 4" in exhausted
    assert "gave up after 4 attempts" in exhausted
    assert "value: GenerationRequest" in exhausted
    assert f'"request_id": "{p["ids"]["exhausted"]}"' in exhausted
    assert f"request {p['ids']['exhausted']}  tenant {world.tenant}" in exhausted

    render = format_entry(entries[p["coords"]["render"]], world.codec)
    assert "value: RenderTask" in render and f"request {p['ids']['render']}" in render

    garbage = format_entry(entries[p["coords"]["garbage"]], world.codec)
    assert "undecodable (BAD_MARKER" in garbage
    assert "270 bytes: \\x00garbage\\xff\\x00garbage" in garbage
    assert garbage.endswith("\\x00g ... (+70 bytes)")  # only the first 200 bytes are shown
    junk = format_entry(entries[p["coords"]["junk"]], world.codec)
    assert "not a DeadLetter" in junk


# -- dlq replay -----------------------------------------------------------------------------------------
def test_dry_run_sends_nothing_and_says_what_would_happen(world: World):
    p = poison(world)
    before = high_watermarks(world.settings)
    report = replay(world.settings, Filters(), execute=False)
    assert high_watermarks(world.settings) == before
    assert report.dry_run
    actions = {a.coordinate: (a.action, a.reason) for a in report.actions}
    c = p["coords"]
    assert actions[c["exhausted"]][0] == "would send"
    assert actions[c["exhausted"]][1].startswith(f"to {world.topics.requests('HIGH')}")
    assert actions[c["render"]][0] == "would send"
    assert actions[c["garbage"]][0] == "skip"
    assert actions[c["garbage"]][1].startswith("undecodable with today's schemas (BAD_MARKER")
    assert actions[c["retired"]][0] == "skip"
    assert "UNKNOWN_MODEL" in actions[c["retired"]][1]
    assert actions[c["junk"]][0] == "skip" and "not a DeadLetter" in actions[c["junk"]][1]
    assert "dry run" in report.summary()


def test_execute_sends_the_original_back_and_a_second_run_sends_nothing(world: World):
    p = poison(world)
    c, ids = p["coords"], p["ids"]
    report = replay(world.settings, Filters(), execute=True, rate=1000)
    assert {a.coordinate for a in report.of("sent")} == {c["exhausted"], c["render"]}

    original = p["originals"]["exhausted"]
    [copy] = [m for m in messages(world.settings, original.topic) if m.offset() != original.offset]
    assert copy.value() == original.value  # byte for byte
    assert copy.key() == original.key
    kept = [(k, v) for k, v in original.headers if k not in (ATTEMPTS, FIRST_FAILED_AT)]
    assert header_list(copy) == [
        *kept,
        (ORIGIN, f"{original.topic}:{original.partition}:{original.offset}".encode()),
        (REPLAYED_FROM, c["exhausted"].encode()),
    ]
    render = p["originals"]["render"]
    [task_copy] = [m for m in messages(world.settings, render.topic) if m.offset() != render.offset]
    assert task_copy.value() == render.value and task_copy.key() == render.key
    assert dict(header_list(task_copy))[REPLAYED_FROM] == c["render"].encode()

    # Again, while the copies are still in flight: nothing new.
    before = high_watermarks(world.settings)
    again = replay(world.settings, Filters(), execute=True, rate=1000)
    assert high_watermarks(world.settings) == before
    assert not again.of("sent")
    reasons = {a.coordinate: a.reason for a in again.actions}
    copy_at = f"{copy.topic()}:{copy.partition()}:{copy.offset()}"
    assert reasons[c["exhausted"]] == f"already replayed as {copy_at}"
    assert reasons[c["render"]].startswith("already replayed as ")

    # Once the request is finished, that is the reason.
    world.row(ids["exhausted"], "SUCCEEDED")
    third = replay(world.settings, Filters(), execute=True, rate=1000)
    assert high_watermarks(world.settings) == before
    assert {a.coordinate: a.reason for a in third.actions}[c["exhausted"]] == "already finished (SUCCEEDED)"


def test_filters_select_the_dead_letters(world: World):
    p = poison(world)
    c, ids, old = p["coords"], p["ids"], p["old"]

    def selected(**kwargs: Any) -> set[str]:
        return {e.coordinate for e in read_dead_letters(world.settings, Filters(**kwargs))}

    assert selected(stages=["renderer"]) == {c["render"]}
    assert selected(stages=["assembler"]) == {c["junk"]}
    assert selected(error_kinds=["retryable"]) == {c["exhausted"], c["retired"]}
    assert selected(error_codes=["BAD_MARKER", "RENDER_FAILED"]) == {c["garbage"], c["render"]}
    assert selected(tenants=[world.tenant]) == {c["exhausted"], c["retired"], c["render"]}
    assert selected(request_ids=[ids["render"], ids["retired"]]) == {c["render"], c["retired"]}
    assert selected(since_ms=old + HOUR_MS) == {c["exhausted"], c["retired"], c["render"]}
    assert selected(until_ms=old + HOUR_MS) == {c["garbage"]}
    assert selected(stages=["gatekeeper"], limit=2) == {c["garbage"], c["exhausted"]}  # oldest first
    report = replay(world.settings, Filters(request_ids=[ids["exhausted"]]))
    assert [(a.coordinate, a.action) for a in report.actions] == [(c["exhausted"], "would send")]


def test_replay_is_paced_to_the_rate(world: World):
    originals = []
    for _ in range(10):
        request = world.request()
        original = world.publish_request(request)
        world.fail(
            Stage.GATEKEEPER,
            original,
            PermanentError("bad luck", code="TEST"),
            request_id=request.request_id,
        )
        originals.append(original)
    started = time.monotonic()
    report = replay(world.settings, Filters(), execute=True, rate=20)
    elapsed = time.monotonic() - started
    assert len(report.of("sent")) == 10
    copies = messages(world.settings, world.topics.requests("NORMAL"))
    copies = [m for m in copies if REPLAYED_FROM in dict(header_list(m))]
    stamps = sorted(m.timestamp()[1] for m in copies)
    assert len(stamps) == 10
    # Nine gaps of 1/20 s: the sends span at least 0.45 s (producer timestamps, whole milliseconds).
    assert stamps[-1] - stamps[0] >= 400
    assert elapsed >= 0.4


# -- the delivery checker ------------------------------------------------------------------------------
def test_a_clean_run_is_ok_and_a_dead_lettered_request_is_not_lost(world: World):
    since = now_ms() - 1000
    ok, rejected = world.request(), world.request()
    world.complete(ok.request_id, "SUCCEEDED")
    world.row(ok.request_id, "SUCCEEDED")
    world.result(ok.request_id)
    world.complete(rejected.request_id, "REJECTED")
    world.row(rejected.request_id, "REJECTED")
    dead = world.request()
    [task] = plan_tasks(dead, "default", 4, now_ms(), now_ms())
    original = world.publish(world.topics.render("default", "NORMAL"), world.codec.write(task), b"k", [])
    world.fail(Stage.RENDERER, original, PermanentError("no", code="RENDER_FAILED"))  # ids from the value
    produce_sync(world.producer, world.topics.completions, b"\x00not avro")

    ids = [ok.request_id, rejected.request_id, dead.request_id]
    report = check_delivery(world.settings, ids, since_ms=since, timeout_s=30)
    assert report.ok, report.summary()
    assert report.submitted == 3
    assert report.terminal == {"SUCCEEDED": 1, "REJECTED": 1}
    assert report.dead_lettered == 1
    assert report.lost == []
    assert report.undecodable == 1
    assert "delivery check: OK" in report.summary()


def test_lost_duplicated_orphaned_and_mismatched_requests_are_reported(world: World):
    since = now_ms() - 1000
    lost, dup, row_only, unsubmitted, obj, mismatch = (world.request().request_id for _ in range(6))
    stray = world.request().request_id
    world.complete(dup)
    world.complete(dup)
    world.row(dup)
    staged = world.staged(dup)  # the sink deletes staged frames once a request is recorded
    # what S3Proxy's filesystem store leaves of an upload cut short by its stop: no frame, no orphan
    world.blobs.put(
        world.settings.s3.staging_bucket,
        f"{frame_key(world.tenant, dup, 1)}-{uuid.uuid4()}",
        b"x",
        "image/png",
    )
    world.row(row_only, indexed=True)
    world.row(unsubmitted, "FAILED", indexed=True)  # found through the tenant index only
    world.complete(obj, "REJECTED")
    world.row(obj, "REJECTED")
    rejected_object = world.result(obj)
    stray_object = world.result(stray)
    world.complete(mismatch, "SUCCEEDED")
    world.row(mismatch, "FAILED")
    world.result(mismatch)  # a SUCCEEDED completion: its object is no orphan

    submitted = [lost, dup, row_only, obj, mismatch]
    report = check_delivery(world.settings, submitted, tenants=[world.tenant], since_ms=since)
    assert not report.ok
    # A row without its completion is lost too: whoever waits for the completion never gets it.
    assert report.lost == sorted([lost, row_only])
    assert report.duplicates == {dup: 2}
    assert report.orphan_rows == sorted([row_only, unsubmitted])
    assert report.orphan_objects == sorted([staged, rejected_object, stray_object])
    assert report.mismatched == [f"{mismatch}: row FAILED, completion SUCCEEDED"]
    assert report.terminal == {"SUCCEEDED": 2, "REJECTED": 1}
    summary = report.summary()
    assert "NOT OK" in summary and f"{dup}  x2" in summary and lost in summary

    # Without tenants given, the tenants come from the completions; unsubmitted rows are not looked up.
    narrow = check_delivery(world.settings, submitted, since_ms=since)
    assert narrow.orphan_rows == [row_only]
    assert narrow.orphan_objects == report.orphan_objects


# -- the command line -----------------------------------------------------------------------------------
def aigc(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIGC_")} | settings.to_env()
    return subprocess.run(
        [sys.executable, "-m", "aigc", *args],
        env=env,
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_dlq_and_check(world: World, tmp_path):
    p = poison(world)
    listed = aigc(world.settings, "dlq", "ls")
    assert listed.returncode == 0, listed.stderr
    assert "dead letters: 5" in listed.stdout and "STORE_UNAVAILABLE" in listed.stdout

    shown = aigc(world.settings, "dlq", "show", "--stage", "renderer")
    assert shown.returncode == 0, shown.stderr
    assert p["coords"]["render"] in shown.stdout and "1 dead letter(s)" in shown.stdout

    dry = aigc(world.settings, "dlq", "replay", "--error-kind", "retryable")
    assert dry.returncode == 0, dry.stderr
    summary = dry.stdout.splitlines()
    assert summary[0] == "replay (dry run: nothing sent; --execute sends): 1 skip, 1 would send"
    assert summary[1].startswith("by stage and reason")
    assert [line.split() for line in summary[2:]] == [
        ["gatekeeper", "STORE_UNAVAILABLE", "skip:", "invalid", "request", "(UNKNOWN_MODEL)", "1"],
        ["gatekeeper", "STORE_UNAVAILABLE", "would", "send", "1"],
    ]  # a summary only: no line per dead letter without --verbose
    verbose = aigc(world.settings, "dlq", "replay", "--error-kind", "retryable", "--verbose")
    assert verbose.stdout.startswith(dry.stdout)
    assert f"{p['coords']['exhausted']}  would send: to " in verbose.stdout
    assert f"{p['coords']['retired']}  skip: invalid request (UNKNOWN_MODEL" in verbose.stdout
    listed_verbose = aigc(world.settings, "dlq", "ls", "--verbose")
    assert listed_verbose.stdout.startswith(listed.stdout.rstrip("\n"))
    assert p["coords"]["render"] in listed_verbose.stdout and p["coords"]["render"] not in listed.stdout
    assert aigc(world.settings, "dlq", "replay", "--since", "yesterday-ish").returncode == 2

    done, missing = world.request().request_id, world.request().request_id
    world.complete(done)
    world.row(done)
    ids = tmp_path / "ids.txt"
    ids.write_text(f"{done}\n")
    good = aigc(world.settings, "check", "--ids-file", str(ids))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "delivery check: OK" in good.stdout
    ids.write_text(f"{done}\n{missing}\n")
    bad = aigc(world.settings, "check", "--ids-file", str(ids))
    assert bad.returncode == 1
    assert "lost: 1" in bad.stdout and missing in bad.stdout
    assert aigc(world.settings, "check").returncode == 2

    # The requests on the request topics since then are the submitted ones: both were dead-lettered.
    recent = aigc(world.settings, "check", "--since-s", "600", "--tenant", world.tenant)
    assert recent.returncode == 0, recent.stdout + recent.stderr
    assert "submitted 2; terminal 0 (none); dead-lettered 2; lost 0" in recent.stdout


def test_reads_end_at_transaction_markers_and_skip_aborted_completions(world: World):
    """The sink publishes completions in transactions: the last offset of a partition is then a commit
    or abort marker that no consumer ever sees, and the read must still end (at end of partition)."""
    committed, aborted = world.request().request_id, world.request().request_id
    tx = make_producer(world.settings, "test-tx", **{"transactional.id": unique("tx")})
    tx.init_transactions(30)
    for request_id, commit in ((committed, True), (aborted, False)):
        tx.begin_transaction()
        record = Completion(
            request_id=request_id,
            tenant_id=world.tenant,
            status="SUCCEEDED",
            outputs=[],
            timings=Timings(),
            finished_at=now_ms(),
        )
        tx.produce(world.topics.completions, world.codec.write(record), request_id.encode())
        # Delivered before the transaction ends: an abort racing an in-flight produce is refused
        # (INVALID_TXN_STATE, fatal to the producer) by Kafka 4's transactions (KIP-890).
        tx.flush(30)
        if commit:
            tx.commit_transaction(30)
        else:
            tx.abort_transaction(30)
    started = time.monotonic()
    reader = BoundedRead(world.settings, [world.topics.completions], timeout_s=20)
    seen = [world.codec.read(m.value(), Completion).request_id for m in reader]
    assert seen == [committed]
    assert reader.unfinished == []
    assert time.monotonic() - started < 10  # ended by the end-of-partition events, not the timeout
    world.row(committed)
    report = check_delivery(world.settings, [committed, aborted], timeout_s=20)
    assert report.terminal == {"SUCCEEDED": 1}
    assert report.lost == [aborted]
    assert report.unfinished == []


def test_chaos_times_a_completion_when_it_was_published_not_by_its_finished_at(world: World):
    """A sink that retried its transaction publishes a Completion whose finished_at (its Cassandra row's)
    is older than the publication; the chaos figures' gaps must count from the publication."""
    since = now_ms() - 1000
    request = world.request()
    decided = now_ms() - 20_000  # the row was written 20 s before the retried transaction published it
    world.complete(request.request_id, finished_at=decided)
    published = now_ms()
    report = ChaosReport(ChaosPlan(seed=1), [request.request_id], {}, 0, None)
    [finished] = _finished(world.settings, report, since)
    assert finished.request_id == request.request_id
    assert published - 5_000 <= finished.finished_at <= published + 1_000
