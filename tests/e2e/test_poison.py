"""The poison corpus (`tests/poison.py`) through the running pipeline, among valid requests.

Over a thousand malformed events of every kind are produced straight onto the request topics, with
valid requests submitted through the SDK in between. Then every event must have come to what the corpus
says: an undecodable one is on the gatekeeper's dead-letter topic byte for byte, a decodable one ends
with exactly one REJECTED (or EXPIRED) Completion carrying a reason code, every valid request succeeds,
no stage died, fresh requests still complete afterwards, and nothing was stored outside its tenant's
prefix in S3 or under another tenant in Cassandra.

The corpus is produced and the outcomes are read once for the module (`outcome`); each test checks one
promise. When something is missing, the failure names the events (kind, what was done to them) and
quotes the warnings and errors from the stage logs.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from cassandra.concurrent import execute_concurrent_with_args

from plumbing.blobs import BlobStore
from plumbing.clock import now_ms
from plumbing.kafka_clients import make_consumer, make_producer
from plumbing.metadata import connect
from plumbing.settings import Settings
from plumbing.topics import Stage, Topics
from producers.checker import check_delivery
from producers.client import Client
from schemas.codec import default_codec
from schemas.records import Completion, DeadLetter, GenerationRequest, Priority
from tests.poison import PoisonEvent, poison_corpus

CORPUS_SIZE = 1000
SEED = 20261123
VALID = 10
DRAIN_TIMEOUT_S = 180.0
PROBE_TIMEOUT_S = 120.0
IDLE_S = 4.0
STALL_S = 60.0
MiB = 1024 * 1024
SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}/[A-Za-z0-9_./-]+")
SAFE_TEXT = re.compile(r"[A-Za-z0-9_.~%-]*")  # what urllib.parse.quote(text, safe="") is made of
ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
STRICT_KINDS = {"bad_enum_index": "BAD_ENUM_INDEX", "bad_union_index": "BAD_UNION_INDEX"}


def valid_request(tenant_id: str, request_id: str, priority: Priority = "NORMAL") -> GenerationRequest:
    """A small valid image request (64x64, 2 steps), created now."""
    return GenerationRequest(
        request_id=request_id, tenant_id=tenant_id, priority=priority, kind="IMAGE",
        prompt="a quiet harbour at dawn", model="tiny-sd", width=64, height=64, steps=2, guidance_scale=7.5,
        created_at=now_ms(),
    )  # fmt: skip


@dataclass
class Outcome:
    """What came of the corpus: where each event was produced, and what the pipeline published."""

    settings: Settings
    events: list[PoisonEvent]
    coordinates: list[tuple[str, int, int]]  # (topic, partition, offset) of events[i]
    valid_tenant: str
    valid_ids: list[str]
    completions: dict[str, list[Completion]] = field(default_factory=dict)
    dead_letters: dict[tuple[str, int, int], list[DeadLetter]] = field(default_factory=dict)
    sink_dead_letters: dict[str | None, list[DeadLetter]] = field(default_factory=dict)
    stages_before: dict[int, str] = field(default_factory=dict)
    produce_s: float = 0.0
    drain_s: float = 0.0

    def by_expect(self, expect: str) -> list[tuple[PoisonEvent, tuple[str, int, int]]]:
        return [(e, c) for e, c in zip(self.events, self.coordinates, strict=True) if e.expect == expect]


def stage_processes() -> dict[int, str]:
    """Live `aigc` stage processes started by this pytest process (the pipeline fixture's supervisor)."""
    found = {}
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == me and state != "Z" and b"aigc" in cmdline:
            found[int(entry.name)] = " ".join(a.decode() for a in cmdline[cmdline.index(b"aigc") + 1 :])
    return found


def log_excerpt(settings: Settings, limit: int = 30) -> str:
    """Errors, tracebacks and unexpected warnings from the stage logs, for failure messages (the
    gatekeeper's one warning per dead letter is expected here and left out)."""
    lines = []
    for log in sorted((settings.home / "logs").glob("*.log")):
        hits = [
            line[:300]
            for line in log.read_text(errors="replace").splitlines()
            if re.search(
                r"WARNING|ERROR|CRITICAL|Traceback|Error\b|rash|^[\w.]+(Error|error|Exception):", line
            )
            and not re.search(r"WARNING\] dead-lettered .*:\d+ \([A-Z_]+\)", line)
        ]
        lines += [f"{log.name}: {line}" for line in hits[-limit:]]
    return "\n".join(lines) or "(nothing in the stage logs)"


def produce_corpus(
    settings: Settings, events: list[PoisonEvent], tenant: str, valid_ids: list[str]
) -> list[Any]:
    """Produce the events (in order) with a valid SDK request after every tenth of them; returns each
    event's (topic, partition, offset)."""
    producer = make_producer(
        settings,
        "poison",
        **{"message.max.bytes": 8 * MiB, "compression.type": "none", "queue.buffering.max.kbytes": 262144},
    )
    reports: list[Any] = [None] * len(events)

    def delivered(index: int) -> Any:
        def report(err: Any, msg: Any) -> None:
            reports[index] = err if err is not None else (msg.topic(), msg.partition(), msg.offset())

        return report

    # After every tenth of the corpus, a valid request through the SDK.
    marks = {(k + 1) * len(events) // len(valid_ids) - 1: rid for k, rid in enumerate(valid_ids)}
    with Client(settings) as client:
        for i, event in enumerate(events):
            while True:
                try:
                    producer.produce(event.topic, event.value, event.key, headers=event.headers,
                                     on_delivery=delivered(i))  # fmt: skip
                    break
                except BufferError:
                    producer.poll(0.1)
            producer.poll(0)
            if i in marks:
                producer.flush(60)
                client.submit(valid_request(tenant, marks[i]))
    assert producer.flush(60) == 0
    failed = [(events[i].describe(), r) for i, r in enumerate(reports) if not isinstance(r, tuple)]
    assert not failed, f"{len(failed)} poison events were not accepted by the broker: {failed[:5]}"
    return reports


def drain(outcome: Outcome, deadline: float) -> None:
    """Read completions and dead letters until every event and valid request has an outcome and nothing
    new arrives for IDLE_S (so a duplicate would be seen), or the deadline."""
    settings = outcome.settings
    topics = Topics(settings)
    codec = default_codec()
    consumer = make_consumer(settings, f"poison-{uuid.uuid4().hex}", "poison")
    consumer.subscribe([topics.completions, topics.dlq(Stage.GATEKEEPER), topics.dlq(Stage.ASSEMBLER)])
    rejected = {e.request_id: c for e, c in outcome.by_expect("rejected")}
    letters = {c for _, c in outcome.by_expect("dead_letter")}
    # The ids inside undecodable events: a completion under one would be a wrong answer, so keep it.
    ghosts = {e.source_request_id for e, _ in outcome.by_expect("dead_letter") if e.source_request_id}
    gatekeeper_dlq, assembler_dlq = topics.dlq(Stage.GATEKEEPER), topics.dlq(Stage.ASSEMBLER)

    def accounted() -> bool:
        """Every event has some outcome (right or wrong: the tests judge), every valid request a result."""
        answered = outcome.completions.keys() | outcome.sink_dead_letters.keys()
        return (
            letters <= outcome.dead_letters.keys()
            and all(rid in answered or c in outcome.dead_letters for rid, c in rejected.items())
            and all(rid in outcome.completions for rid in outcome.valid_ids)
        )

    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline:
            messages = consumer.consume(500, 0.5)
            for msg in messages:
                if msg.error():
                    continue
                if msg.topic() == gatekeeper_dlq:
                    letter = codec.read(msg.value(), DeadLetter)
                    coords = (letter.original_topic, letter.original_partition, letter.original_offset)
                    outcome.dead_letters.setdefault(coords, []).append(letter)
                elif msg.topic() == assembler_dlq:
                    letter = codec.read(msg.value(), DeadLetter)
                    outcome.sink_dead_letters.setdefault(letter.request_id, []).append(letter)
                else:
                    completion = codec.read(msg.value(), Completion)
                    rid = completion.request_id
                    if rid in rejected or rid in outcome.valid_ids or rid in ghosts:
                        outcome.completions.setdefault(rid, []).append(completion)
                last_new = time.monotonic()
            quiet = time.monotonic() - last_new
            if (accounted() and quiet >= IDLE_S) or quiet >= STALL_S:  # done, or stuck: the tests judge
                return
    finally:
        consumer.close()


@pytest.fixture(scope="module")
def outcome(pipeline: Settings) -> Outcome:
    events = poison_corpus(pipeline, CORPUS_SIZE, SEED)
    run = uuid.uuid4().hex[:8]
    tenant, valid_ids = f"poison-valid-{run}", [f"valid-{run}-{i:02d}" for i in range(VALID)]
    result = Outcome(pipeline, events, [], tenant, valid_ids, stages_before=stage_processes())
    started = time.monotonic()
    result.coordinates = produce_corpus(pipeline, events, tenant, valid_ids)
    result.produce_s = time.monotonic() - started
    started = time.monotonic()
    drain(result, started + DRAIN_TIMEOUT_S)
    result.drain_s = time.monotonic() - started
    print(f"[poison] {len(events)} events produced in {result.produce_s:.1f} s, outcomes read in "
          f"{result.drain_s:.1f} s")  # fmt: skip
    return result


def _summary(events: list[PoisonEvent], limit: int = 12) -> str:
    kinds = collections.Counter(e.kind for e in events)
    samples = "\n".join(f"  - {e.describe()}" for e in events[:limit])
    return f"{len(events)} event(s), by kind {dict(kinds)}:\n{samples}"


# -- the promises -----------------------------------------------------------------------------------


def test_the_corpus_is_big_and_varied(outcome: Outcome) -> None:
    kinds = collections.Counter(e.kind for e in outcome.events)
    assert len(outcome.events) >= CORPUS_SIZE and len(kinds) >= 10, kinds
    assert {e.expect for e in outcome.events} == {"dead_letter", "rejected"}
    assert max(len(e.value) for e in outcome.events) > 5 * MiB


def test_every_undecodable_event_is_dead_lettered_byte_for_byte(outcome: Outcome) -> None:
    missing, wrong = [], []
    for event, coords in outcome.by_expect("dead_letter"):
        letters = outcome.dead_letters.get(coords, [])
        if not letters:
            missing.append(event)
            continue
        [letter] = letters
        if (
            letter.value != event.value
            or letter.key != event.key
            or not letter.error_code
            or letter.stage != "gatekeeper"
            or letter.error_code != event.reason_code
            or [(h.key, h.value) for h in letter.headers] != event.headers
        ):
            wrong.append((event, letter.error_code, len(letter.value or b"")))
    assert not missing, (
        f"not dead-lettered: {_summary(missing)}\n--- stage logs ---\n{log_excerpt(outcome.settings)}"
    )
    assert not wrong, (
        f"dead letters that differ from the original: {[(e.describe(), c, n) for e, c, n in wrong][:10]}"
    )


def test_invalid_enum_and_union_indices_are_dead_lettered_unanswered(outcome: Outcome) -> None:
    # The expectation is fixed here, not computed by the codec under test (as `judge` does): fastavro
    # alone reads these as valid requests, and they were once rendered SUCCEEDED.
    events = [e for e in outcome.events if e.kind in STRICT_KINDS]
    assert {e.kind for e in events} == STRICT_KINDS.keys()
    assert any("index -1" in e.note for e in events), _summary(events)
    wrong = [
        e.describe() for e in events if (e.expect, e.reason_code) != ("dead_letter", STRICT_KINDS[e.kind])
    ]
    assert not wrong, wrong
    coordinates = dict(zip(map(id, outcome.events), outcome.coordinates, strict=True))
    for event in events:  # bytes, key and headers intact: checked for every dead letter above
        [letter] = outcome.dead_letters[coordinates[id(event)]]
        assert letter.error_code == STRICT_KINDS[event.kind], (event.describe(), letter.error_code)
    answered = [e.describe() for e in events if e.source_request_id in outcome.completions]
    assert not answered, f"completions for undecodable requests: {answered}"


def test_aigc_check_passes_over_the_poison_run(outcome: Outcome, tmp_path: Path) -> None:
    """Every request id of the run, rejected ones of every kind (bad tenant ids included), dead-lettered
    ones and valid ones: the checker reads their rows and buckets without an error, and finds nothing
    lost, duplicated or left behind."""
    ids = {e.request_id for e in outcome.events if e.request_id is not None} | set(outcome.valid_ids)
    report = check_delivery(outcome.settings, ids, timeout_s=60)
    assert report.ok, report.summary()
    assert report.terminal.get("REJECTED", 0) >= len([e for e in outcome.events if e.status == "REJECTED"])
    # The CLI over an ids file, as an operator runs it (ids with a line break cannot be in one).
    lines = sorted(
        i for i in ids if i.strip() == i and not re.search(r"[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]", i)
    )
    (tmp_path / "ids").write_text("".join(f"{i}\n" for i in lines), encoding="utf-8")
    tenants = {e.tenant_id for e in outcome.events if e.request_id in lines and e.tenant_id is not None}
    assert any(not ID.fullmatch(t) for t in tenants), "the run should hold requests with bad tenant ids"
    command = [
        Path(sys.executable).with_name("aigc"),
        "check",
        "--ids-file",
        tmp_path / "ids",
        "--timeout",
        "60",
    ]
    env = {**os.environ, **outcome.settings.to_env()}
    cli = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert cli.returncode == 0, f"{cli.stdout[-3000:]}\n{cli.stderr[-3000:]}"
    assert "delivery check: OK" in cli.stdout and "Traceback" not in cli.stderr, cli.stdout[-2000:]


def test_every_decodable_poison_event_ends_with_exactly_one_rejection(outcome: Outcome) -> None:
    unanswered, duplicated, wrong = [], [], []
    for event, _ in outcome.by_expect("rejected"):
        found = outcome.completions.get(event.request_id, [])  # type: ignore[arg-type]
        if not found:
            unanswered.append(event)
        elif len(found) > 1:
            duplicated.append(event)
        else:
            [completion] = found
            if (completion.status, completion.reason_code) != (event.status, event.reason_code):
                wrong.append((event.describe(), completion.status, completion.reason_code))
            elif completion.tenant_id != event.tenant_id or completion.outputs:
                wrong.append((event.describe(), "tenant/outputs", completion.tenant_id[:80]))
    sink_letters = {
        e.describe(): [d.error_code for d in outcome.sink_dead_letters.get(e.request_id, [])]
        for e in unanswered[:12]
    }
    assert not unanswered, (
        f"no Completion for {_summary(unanswered)}\nassembler dead letters for them: {sink_letters}\n"
        f"--- stage logs ---\n{log_excerpt(outcome.settings)}"
    )
    assert not duplicated, f"more than one Completion: {_summary(duplicated)}"
    assert not wrong, f"wrong status or reason: {wrong[:10]}"


def test_every_valid_request_in_between_succeeds(outcome: Outcome) -> None:
    statuses = {rid: [c.status for c in outcome.completions.get(rid, [])] for rid in outcome.valid_ids}
    assert all(s == ["SUCCEEDED"] for s in statuses.values()), (
        f"{statuses}\n--- stage logs ---\n{log_excerpt(outcome.settings)}"
    )


def test_no_stage_died_and_fresh_requests_still_complete(outcome: Outcome) -> None:
    alive = stage_processes()
    assert outcome.stages_before, "no stage processes found under this pytest process"
    died = {pid: verb for pid, verb in outcome.stages_before.items() if pid not in alive}
    assert not died, f"stages died during the corpus: {died}\n{log_excerpt(outcome.settings)}"
    probes = [f"probe-{uuid.uuid4().hex[:8]}-{p.lower()}" for p in ("HIGH", "NORMAL", "LOW")]
    with Client(outcome.settings) as client:
        priorities: tuple[Priority, ...] = ("HIGH", "NORMAL", "LOW")
        for request_id, priority in zip(probes, priorities, strict=True):
            client.submit(valid_request(outcome.valid_tenant, request_id, priority))
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        results: dict[str, Any] = {}
        for request_id in probes:
            try:
                wait_s = max(1.0, deadline - time.monotonic())
                results[request_id] = client.wait(request_id, timeout_s=wait_s).status
            except TimeoutError:
                results[request_id] = "no completion"
    assert set(results.values()) == {"SUCCEEDED"}, f"{results}\n{log_excerpt(outcome.settings)}"


def test_objects_stay_inside_their_tenants_prefix(outcome: Outcome) -> None:
    s3 = outcome.settings.s3
    blobs = BlobStore(s3)
    poison_tenants = {e.tenant_id for e in outcome.events if e.tenant_id is not None}
    valid = set(outcome.valid_ids)
    for bucket in (s3.staging_bucket, s3.results_bucket):
        for key in blobs.list_keys(bucket):
            assert SAFE_KEY.fullmatch(key) and ".." not in key.split("/"), f"s3://{bucket}/{key}"
            tenant = key.split("/", 1)[0]
            assert tenant not in poison_tenants, f"a rejected request stored s3://{bucket}/{key}"
            if tenant == outcome.valid_tenant:
                assert any(f"/{rid}/" in key for rid in valid) or "/probe-" in key, f"s3://{bucket}/{key}"


def test_cassandra_rows_belong_to_their_tenant(outcome: Outcome) -> None:
    settings = outcome.settings
    ks = settings.cassandra.keyspace
    cluster, session = connect(settings.cassandra)
    try:
        select = session.prepare(
            f"SELECT request_id, tenant_id, status, reason_code FROM {ks}.requests WHERE request_id = ?"
        )

        def rows(ids: list[str]) -> dict[str, Any]:
            keyable = [i for i in ids if 0 < len(i.encode()) <= 65535]
            results = execute_concurrent_with_args(session, select, [(i,) for i in keyable], concurrency=32)
            return {i: r.result_or_exc.one() for i, r in zip(keyable, results, strict=True)}

        rejected = [e for e, _ in outcome.by_expect("rejected")]
        found = rows([e.request_id for e in rejected])  # type: ignore[misc]
        missing = [e for e in rejected if e.request_id in found and found[e.request_id] is None]
        wrong = [
            (e.describe(), row.tenant_id[:80], row.status, row.reason_code)
            for e in rejected
            if (row := found.get(e.request_id or "")) is not None
            and (unquote(row.tenant_id), row.status, row.reason_code)
            != (e.tenant_id, e.status, e.reason_code)
        ]
        # A rejected request's tenant id is stored escaped: printable ASCII whatever the producer sent.
        raw = [
            (e.describe(), row.tenant_id[:80])
            for e in rejected
            if (row := found.get(e.request_id or "")) is not None and not SAFE_TEXT.fullmatch(row.tenant_id)
        ]
        assert not raw, f"rows holding a tenant id unescaped: {raw[:10]}"
        assert not wrong, f"rows under another tenant or with another decision: {wrong[:10]}"
        assert not missing, f"no row for {_summary(missing)}"
        ghosts = [e.source_request_id for e, _ in outcome.by_expect("dead_letter") if e.source_request_id]
        recorded = {i: r for i, r in rows(ghosts).items() if r is not None}
        assert not recorded, f"rows for undecodable events: {sorted(recorded)[:10]}"
        valid = rows(outcome.valid_ids)
        assert all(r is not None and r.tenant_id == outcome.valid_tenant for r in valid.values()), valid
    finally:
        cluster.shutdown()
