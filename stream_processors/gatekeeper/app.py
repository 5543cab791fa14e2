"""The gatekeeper faust app: request topics in, render tasks, status events, decisions and dead letters out.

Reads top to bottom: the app, its topics, its two tables, one agent per priority (so a flood of low
priority requests never queues in front of high ones), each a few lines around `Gate.admit`.

Delivery: at least once. faust flushes its producer before it commits an offset, so every message
sent for an event (and every table write, through the changelog) is on the broker before the event
counts as done; a crash repeats the event instead of losing it, and `Gate.admit` makes the repeat
harmless (the ``seen`` entry of a redelivered offset keeps its first decision; tasks and status events
are idempotent downstream; terminal decisions are written once by the sink).

Tables (in memory, changelogged to compacted topics, partitioned like the request topics since
requests are keyed by tenant):
- ``seen``: request_id -> `tables.Seen` (origin topic:partition:offset, first seen ms, the decision, the
  partition). Entries older than the dedupe window are deleted while the agent handles later events of
  the same partition (faust writes a key's changelog to the partition of the event being processed).
- ``buckets``: tenant -> `tables.Bucket` (token-bucket state).

Values are stored as JSON objects (`tables.TypedTable` converts them on the way in and out).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from typing import Any, cast

import faust

from plumbing import tracing
from plumbing.backoff import Backoff
from plumbing.call_counts import CallCounts
from plumbing.cancellations import CancellationWatcher
from plumbing.clock import now_ms
from plumbing.dead_letters import Original
from plumbing.headers import Outgoing
from plumbing.kafka_clients import CONSUMER_SESSION_MS, make_consumer
from plumbing.log_format import bind_message
from plumbing.observability import serve
from plumbing.retries import route_failure
from plumbing.settings import Settings
from plumbing.shutdown import exit_after
from plumbing.tenants import TenantQuotas
from plumbing.topics import MAX_ENVELOPE_BYTES, PRIORITIES, Stage, Topics
from schemas.codec import default_codec
from stream_processors.gatekeeper import faust_fixes
from stream_processors.gatekeeper.admission import Admission, Gate
from stream_processors.gatekeeper.backlog import BacklogMonitor
from stream_processors.gatekeeper.inflight import CompletionFollower, InflightCaps
from stream_processors.gatekeeper.metrics import GatekeeperMetrics, observe
from stream_processors.gatekeeper.moderation import build_moderator
from stream_processors.gatekeeper.stall import StallGuard
from stream_processors.gatekeeper.tables import Bucket, Seen, TypedTable

log = logging.getLogger(__name__)
SHUTDOWN_GRACE_S = 10.0  # a stop with the broker reachable takes about a second
# Waits between tries of a request under back-pressure (`admit_or_route`): 0.5 s, doubling up to 30 s.
BACK_PRESSURE_BACKOFF = Backoff(first_s=0.5, max_s=30.0)


def make_gate(
    settings: Settings,
    cancellations: CancellationWatcher | None,
    backlog: BacklogMonitor | None = None,
    caps: InflightCaps | None = None,
    quotas: TenantQuotas | None = None,
) -> Gate:
    """The `Gate` of a running gatekeeper: the default codec, the moderator its settings describe, and the
    cancellation, backlog, in-flight and quota state it consults (each optional: absent, it never refuses)."""
    conf = settings.gatekeeper
    return Gate(
        settings,
        default_codec(),
        build_moderator(conf),
        cancellations.is_cancelled if cancellations else (lambda request_id, tenant_id: False),
        backlog.overloaded if backlog else (lambda pool, priority: None),
        caps.would_exceed if caps else (lambda tenant_id, priority, tasks: False),
        quotas.tier_of if quotas else None,
    )


def create_app(
    settings: Settings, gate: Gate, caps: InflightCaps | None = None, metrics: GatekeeperMetrics | None = None
) -> faust.App:
    """The gatekeeper's faust app: its two tables and one agent per request topic, each running `Handler`."""
    topics = Topics(settings)
    conf = settings.gatekeeper
    partitions = settings.kafka.request_partitions
    # faust's local state folder (default: ./<app_id>-data), one per process on a host
    datadir = settings.home / "gatekeeper" / (settings.instance or "gatekeeper")
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        conf.app_id,
        broker=[f"kafka://{server}" for server in settings.kafka.bootstrap_servers.split(",")],
        store="memory://",
        datadir=str(datadir),
        processing_guarantee="at_least_once",
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=partitions,
        topic_replication_factor=settings.kafka.replication_factor,
        consumer_auto_offset_reset="earliest",
        # A topic the consumer's metadata missed (a changelog faust had just created: faust_fixes, 8.) is
        # left out of the group's assignment, so no member recovers that table, until the next refresh:
        # every 30 s instead of aiokafka's 5 minutes.
        consumer_metadata_max_age_ms=30_000,
        producer_acks=-1,
        producer_max_request_size=MAX_ENVELOPE_BYTES,  # a dead letter carries a whole request
        consumer_max_fetch_size=MAX_ENVELOPE_BYTES,
        broker_max_poll_records=min(conf.max_poll_records, max(1, conf.stream_buffer_maxsize // 5)),
        producer_linger=0.002,
        stream_buffer_maxsize=conf.stream_buffer_maxsize,
        broker_commit_interval=conf.commit_interval_s,
        broker_session_timeout=CONSUMER_SESSION_MS / 1000,
        broker_heartbeat_interval=2.0,
        consumer_group_instance_id=f"{conf.app_id}.{settings.instance}" if settings.instance else None,
        web_enabled=conf.web_port is not None,
        web_port=conf.web_port or 6066,
    )
    hole_reader = partial(
        make_consumer,
        settings,
        f"{conf.app_id}.holes",
        "gatekeeper-holes",
        **{"isolation.level": "read_uncommitted"},  # as faust's consumer reads
    )
    deliveries = faust_fixes.install(app, faust_fixes.HoleCheck(hole_reader))

    sources = {p: app.topic(topics.requests(p)) for p in PRIORITIES}

    def changelog(table: str) -> faust.types.TopicT:
        return app.topic(
            topics.gatekeeper_changelog(table),
            partitions=partitions,
            compacting=True,
            deleting=False,
            internal=True,
            # As faust's own changelog topics: a changelog is read by table recovery, never by a stream, so
            # it must not count as an acked topic. With acks on, faust's livelock detector watches its
            # partitions and, once this worker has written past the recovered position, logs "Stream has
            # not started processing TP(...changelog...)" every few seconds from stream_processing_timeout
            # (300 s) after start, though nothing is wrong.
            acks=False,
            key_serializer="json",
            value_serializer="json",
        )

    seen = app.Table("seen", partitions=partitions, changelog_topic=changelog("seen"))
    buckets = app.Table("buckets", partitions=partitions, changelog_topic=changelog("buckets"))
    typed_seen = TypedTable(seen, Seen)
    expiry = SeenExpiry(typed_seen, int(conf.dedupe_window_s * 1000))
    handler = Handler(app, gate, typed_seen, TypedTable(buckets, Bucket), expiry, caps, metrics, deliveries)

    async def admit(stream: faust.StreamT) -> None:
        async for event in stream.events():
            await handler.handle(event.message)

    for priority, source in sources.items():
        app.agent(source, name=f"{Stage.GATEKEEPER.value}.{priority.suffix}")(admit)
    return app


class Handler:
    """What an agent does with one consumed request: `Gate.admit`, then the decision carried out.

    The table entries are stored before the outputs are sent (faust flushes both before it commits the
    offset); a send that fails, at once or on delivery (checked before each commit:
    `faust_fixes.Deliveries`), ends the process so the request is redelivered.
    """

    def __init__(
        self,
        app: faust.App,
        gate: Gate,
        seen: TypedTable[Seen],
        buckets: TypedTable[Bucket],
        expiry: SeenExpiry,
        caps: InflightCaps | None,
        metrics: GatekeeperMetrics | None,
        deliveries: faust_fixes.Deliveries,
    ) -> None:
        self.app = app
        self.deliveries = deliveries
        self.gate = gate
        self.seen = seen
        self.buckets = buckets
        self.caps = caps
        self.metrics = metrics
        self.expiry = expiry
        self.topics: dict[str, faust.types.TopicT] = {}

    async def handle(self, msg: Any) -> None:
        """Decide the request in ``msg`` (a faust message) and carry the decision out; on any error exit
        the process before the next commit, so the request is redelivered.

        faust would restart a crashed agent and count its event as done, so an exception that left here
        lost the request: a table write raised ``PartitionsMismatch`` while the consumer's metadata did
        not yet hold a just-created changelog topic (the CI-sized chaos test, three requests never
        admitted).
        """
        try:
            await self._handle(msg)
        except Exception:
            log.critical(
                "could not handle %s:%s:%s; exiting so it is redelivered",
                msg.topic,
                msg.partition,
                msg.offset,
                exc_info=True,
            )
            logging.shutdown()
            os._exit(faust_fixes.Deliveries.EXIT_STATUS)

    async def _handle(self, msg: Any) -> None:
        original = Original(
            msg.topic,
            msg.partition,
            msg.offset,
            int(msg.timestamp * 1000),
            msg.key,
            msg.value,
            _header_list(msg.headers),
        )
        bind_message(original.headers)
        clock = now_ms()
        self.expiry.purge(msg.partition, clock)
        with tracing.consuming("gatekeeper.admit", original.headers) as span:
            admission = await admit_or_route(self.gate, original, self.seen, self.buckets, clock)
            priority = msg.topic.rpartition(".")[2].upper()
            tracing.annotate(
                span, request_id=admission.request_id, priority=priority, outcome=admission.verdict
            )
        self._store(admission, msg.partition, clock)
        await self._send(admission.outputs)
        self.deliveries.done(msg.topic, msg.partition, msg.offset)
        if self.metrics is not None:
            self.metrics.decided(admission, msg.topic, msg.timestamp)
        if admission.verdict == "DEAD_LETTERED":
            log.warning("dead-lettered %s:%s:%s (%s)", msg.topic, msg.partition, msg.offset, admission.reason)

    def _store(self, admission: Admission, partition: int, clock: int) -> None:
        """The admission's table entries, and its tasks counted against the tenant's in-flight cap."""
        if admission.seen is not None and admission.request_id:
            self.seen[admission.request_id] = replace(admission.seen, partition=partition)
            self.expiry.track(partition, admission.request_id, clock)
        if admission.bucket is not None and admission.tenant_id:
            self.buckets[admission.tenant_id] = admission.bucket
        if self.caps is not None and admission.verdict == "ACCEPTED":
            self.caps.admitted(
                admission.request_id or "",
                admission.tenant_id or "",
                admission.priority or "NORMAL",
                admission.tasks,
            )

    async def _send(self, outputs: list[Outgoing]) -> None:
        """Send ``outputs`` in order (a failure ends the process in `handle`)."""
        for out in outputs:
            topic = self.topics.get(out.topic) or self.topics.setdefault(out.topic, self.app.topic(out.topic))
            sent = await topic.send(
                key=out.key, value=out.value, partition=out.partition, headers=cast(Any, out.headers)
            )
            self.deliveries.track(cast(Any, sent))  # its delivery is checked before the next commit


async def admit_or_route(
    gate: Gate, original: Original, seen: Mapping[str, Seen], buckets: Mapping[str, Bucket], clock: int
) -> Admission:
    """`Gate.admit`, with a failure routed like every stage routes one (retry topic or dead letter).

    Back-pressure waits and tries again. An unknown error (`route_failure` raises it) ends the worker in
    `Handler.handle`, so the request is redelivered.
    """
    failures = 0
    while True:
        try:
            return gate.admit(original, seen, buckets, clock)
        except Exception as exc:  # noqa: BLE001 - route_failure decides; it raises what it does not know
            routed = route_failure(
                gate.codec, gate.topics, gate.settings.retry, Stage.GATEKEEPER, original, exc, clock
            )
            if routed is not None:
                log.warning("%s %s: %s", "dead-lettered" if routed.dead else "retrying", original.origin, exc)
                return Admission(
                    "DEAD_LETTERED" if routed.dead else "RETRYING",
                    [Outgoing(routed.topic, routed.key, routed.value, routed.headers)],
                )
            failures += 1
            delay = BACK_PRESSURE_BACKOFF.delay_s(failures)
            log.warning("back-pressure on %s: %s; trying again in %.1f s", original.origin, exc, delay)
            await asyncio.sleep(delay)


class SeenExpiry:
    """Deletes ``seen`` entries older than the dedupe window, partition by partition, inside the agent."""

    def __init__(self, seen: TypedTable[Seen], window_ms: int) -> None:
        self.seen = seen
        self.window_ms = window_ms
        self.queues: dict[int, collections.deque[tuple[int, str]]] = {}

    def track(self, partition: int, request_id: str, at_ms: int) -> None:
        """Remember that ``request_id``'s entry, stored while handling ``partition``, dates from ``at_ms``."""
        self.queues[partition].append((at_ms, request_id))

    def purge(self, partition: int, now: int) -> None:
        """Delete the entries of ``partition`` that are older than the window at ``now`` (epoch ms)."""
        queue = self.queues.get(partition)
        if queue is None:  # first event of this partition since start: rebuild from recovered state
            entries = [(v.first_seen, k) for k, v in self.seen.entries() if v.partition == partition]
            queue = self.queues[partition] = collections.deque(sorted(entries))
        while queue and now - queue[0][0] >= self.window_ms:
            _, request_id = queue.popleft()
            entry = self.seen.get(request_id)
            if entry is not None and now - entry.first_seen >= self.window_ms:
                del self.seen[request_id]


def _header_list(headers: Any) -> list[tuple[str, bytes | None]]:
    if not headers:
        return []
    if isinstance(headers, dict):
        return list(headers.items())
    return list(headers)


class BoundedWorker(faust.Worker):
    """A faust worker that stops within `SHUTDOWN_GRACE_S` of SIGTERM or SIGINT, broker or not."""

    def _schedule_shutdown(self, signal: Any) -> None:  # mode's hook for SIGTERM and SIGINT
        super()._schedule_shutdown(signal)
        exit_after(SHUTDOWN_GRACE_S, "the gatekeeper")


def run(settings: Settings) -> None:
    """Run the gatekeeper worker until SIGINT or SIGTERM."""
    if (counts := CallCounts.when_on(settings.call_counts_dir)) is not None:
        counts.count_aiokafka()  # faust's clients are aiokafka's: librdkafka statistics miss them
    obs = serve(settings, Stage.GATEKEEPER.value, "moderation", "assigned")
    cancellations = CancellationWatcher(settings).start()
    backlog = BacklogMonitor(settings).start()
    caps = InflightCaps(settings.gatekeeper.tenant_inflight_cap)
    follower = CompletionFollower(settings, caps).start()
    guard = StallGuard(settings).start()
    quotas = TenantQuotas(settings).start()
    settings.home.mkdir(parents=True, exist_ok=True)  # faust's datadir lives there; a fresh clone has none
    gate = make_gate(settings, cancellations, backlog, caps, quotas)
    obs.readiness.mark("moderation")
    app = create_app(
        settings, gate, caps, GatekeeperMetrics(settings.observability.bucket_top_n, gate.tier_of)
    )
    observe(app, obs.readiness)
    worker = BoundedWorker(
        app, loglevel=settings.log_level.lower(), quiet=True, override_logging=settings.log_format == "text"
    )
    try:
        worker.execute_from_commandline()
    finally:
        guard.stop()
        quotas.stop()
        follower.stop()
        backlog.stop()
        cancellations.stop()
