"""Bootstrap from one declarative source each: topics (`plumbing.topics`), keyspace and tables
(``infra/cql/*.cql``), buckets (`plumbing.settings.S3Settings` and the assembler's quarantine bucket), the
renderers' share groups (`share_group_config`, from `plumbing.settings.RendererSettings`).

Every step creates what is missing and leaves what matches alone, so re-running it changes nothing;
`bootstrap` returns the list of changes it made (empty on a second run).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from string import Template

from cassandra.cluster import Session
from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
    ResourceType,
)

from plumbing.blobs import BlobStore
from plumbing.kafka_clients import make_admin, renderer_group
from plumbing.metadata import connect
from plumbing.settings import Settings
from plumbing.topics import Topics, TopicSpec

log = logging.getLogger(__name__)
CQL_DIR = Path(__file__).resolve().parent / "cql"
ADMIN_TIMEOUT_S = 30.0


def cql_statements(settings: Settings, cql_dir: Path = CQL_DIR) -> list[str]:
    """The statements of every ``.cql`` file in order, with the keyspace settings filled in."""
    values = {
        "keyspace": settings.cassandra.keyspace,
        "replication_factor": str(settings.cassandra.replication_factor),
    }
    statements = []
    for path in sorted(cql_dir.glob("*.cql")):
        text = Template(path.read_text(encoding="utf-8")).substitute(values)
        text = re.sub(r"--[^\n]*", "", text)
        statements += [s.strip() for s in text.split(";") if s.strip()]
    return statements


def ensure_topics(settings: Settings, specs: list[TopicSpec] | None = None) -> list[str]:
    """Create the missing topics of ``specs`` (default: every topic of the settings), raise partition counts
    that are too low and set drifted topic configs; returns one line per change.
    """
    admin = make_admin(settings)
    specs = specs if specs is not None else Topics(settings).all()
    existing = admin.list_topics(timeout=ADMIN_TIMEOUT_S).topics
    missing = [s for s in specs if s.name not in existing]
    grow = [s for s in specs if s.name in existing and len(existing[s.name].partitions) < s.partitions]
    present = [s for s in specs if s.name in existing and s.config]
    changes = _create_missing(settings, admin, missing)
    changes += _raise_partitions(admin, grow)
    changes += _align_configs(admin, present)
    return changes


def _create_missing(settings: Settings, admin: AdminClient, missing: list[TopicSpec]) -> list[str]:
    """Create the ``missing`` topics and wait for their leaders; a topic another bootstrap created
    meanwhile is not an error."""
    changes: list[str] = []
    if missing:
        futures = admin.create_topics(
            [
                NewTopic(s.name, s.partitions, settings.kafka.replication_factor, config=s.config)
                for s in missing
            ],
            operation_timeout=ADMIN_TIMEOUT_S,
        )
        for name, future in futures.items():
            try:
                future.result()
                changes.append(f"topic {name}: created")
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":  # a concurrent bootstrap won the race
                    raise
        _wait_for_leaders(admin, [s.name for s in missing])
    return changes


def _raise_partitions(admin: AdminClient, grow: list[TopicSpec]) -> list[str]:
    """Raise the partition count of the ``grow`` topics to their specs' (partitions never shrink)."""
    changes: list[str] = []
    if grow:
        for name, future in admin.create_partitions(
            [NewPartitions(s.name, s.partitions) for s in grow]
        ).items():
            future.result()
            changes.append(f"topic {name}: partitions raised")
    return changes


def _align_configs(admin: AdminClient, present: list[TopicSpec]) -> list[str]:
    """Set the configs of the ``present`` topics that differ from their specs'."""
    changes: list[str] = []
    if present:
        resources = [ConfigResource(ConfigResource.Type.TOPIC, s.name) for s in present]
        described = admin.describe_configs(resources)
        for spec, resource in zip(present, resources, strict=True):
            current = described[resource].result()
            drift = {k: v for k, v in spec.config.items() if current.get(k) is None or current[k].value != v}
            if drift:
                entries = [
                    ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in drift.items()
                ]
                change = ConfigResource(ConfigResource.Type.TOPIC, spec.name, incremental_configs=entries)
                for future in admin.incremental_alter_configs([change]).values():
                    future.result()
                changes.append(f"topic {spec.name}: set {', '.join(sorted(drift))}")
    return changes


def _wait_for_leaders(admin: AdminClient, names: list[str], timeout_s: float = ADMIN_TIMEOUT_S) -> None:
    """Return once every partition of ``names`` has a leader: a created topic is usable only then."""
    deadline = time.monotonic() + timeout_s
    while True:
        topics = admin.list_topics(timeout=ADMIN_TIMEOUT_S).topics
        waiting = [
            name
            for name in names
            if name not in topics or any(p.leader < 0 for p in topics[name].partitions.values())
        ]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no leader yet for {', '.join(waiting[:5])}")
        time.sleep(0.1)


def share_group_config(settings: Settings) -> dict[str, str]:
    """Group settings of each pool's renderer share group.

    A new group starts at the earliest offset (tasks produced before the first renderer joined are
    rendered); a task stays locked to the renderer that took it for longer than its render (the client
    cannot renew a lock); after ``share_delivery_limit`` deliveries the broker archives a task, so the
    renderer dead-letters it on its last delivery; aborted transactions never show, as in classic mode."""
    conf = settings.renderer
    return {
        "share.auto.offset.reset": "earliest",
        "share.record.lock.duration.ms": str(conf.share_lock_ms),
        "share.delivery.count.limit": str(conf.share_delivery_limit),
        "share.isolation.level": "read_committed",
    }


def ensure_share_groups(settings: Settings) -> list[str]:
    """Set `share_group_config` on each pool's renderer share group (share mode only); a group's config
    can be set before any member has joined."""
    if settings.renderer.consumer != "share":
        return []
    admin = make_admin(settings)
    wanted = share_group_config(settings)
    changes = []
    topics = Topics(settings)
    metadata = admin.list_topics(timeout=ADMIN_TIMEOUT_S).topics
    for pool in settings.pools:
        for priority in ("HIGH", "NORMAL", "LOW"):
            name = topics.render(pool, priority)
            if name in metadata and len(metadata[name].partitions) > settings.kafka.render_partitions:
                # Partitions cannot shrink: the share group would give each renderer whole partitions.
                log.warning(
                    "%s has %d partitions, more than kafka.render_partitions (%d): share-group renderers "
                    "share a partition only while they outnumber the partitions; recreate it with fewer",
                    name,
                    len(metadata[name].partitions),
                    settings.kafka.render_partitions,
                )
        group = renderer_group(settings, pool)
        current = admin.describe_configs([ConfigResource(ResourceType.GROUP, group)])
        described = next(iter(current.values())).result()
        drift = {k: v for k, v in wanted.items() if described.get(k) is None or described[k].value != v}
        if not drift:
            continue
        entries = [ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in drift.items()]
        change = ConfigResource(ResourceType.GROUP, group, incremental_configs=entries)
        for future in admin.incremental_alter_configs([change]).values():
            future.result()
        changes.append(f"share group {group}: set {', '.join(sorted(drift))}")
    return changes


def ensure_schema(settings: Settings) -> list[str]:
    """Apply the CQL files of infra/cql to the keyspace; returns one line per keyspace, table or type
    created."""
    cluster, session = connect(settings.cassandra)
    try:
        ks = settings.cassandra.keyspace
        before = _schema_objects(session, ks)
        for statement in cql_statements(settings):
            session.execute(statement, timeout=60)
        after = _schema_objects(session, ks)
        return [f"cassandra {name}: created" for name in sorted(after - before)]
    finally:
        cluster.shutdown()


def _schema_objects(session: Session, keyspace: str) -> set[str]:
    objects = {
        f"keyspace {r.keyspace_name}"
        for r in session.execute(
            "SELECT keyspace_name FROM system_schema.keyspaces WHERE keyspace_name = %s", (keyspace,)
        )
    }
    objects |= {
        f"table {keyspace}.{r.table_name}"
        for r in session.execute(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s", (keyspace,)
        )
    }
    objects |= {
        f"type {keyspace}.{r.type_name}"
        for r in session.execute(
            "SELECT type_name FROM system_schema.types WHERE keyspace_name = %s", (keyspace,)
        )
    }
    return objects


def ensure_buckets(settings: Settings) -> list[str]:
    """Create the missing S3 buckets (staged frames, results, quarantine); one line per bucket created."""
    store = BlobStore(settings.s3)
    return [
        f"bucket {bucket}: created"
        for bucket in (
            settings.s3.staging_bucket,
            settings.s3.results_bucket,
            settings.assembler.quarantine_bucket,
        )
        if store.ensure_bucket(bucket)
    ]


def bootstrap(settings: Settings, echo: Callable[[str], None] = print) -> list[str]:
    """Make the topics, share groups, keyspace and buckets the settings name exist, idempotently; ``echo``
    gets each change and a summary. Returns the changes.
    """
    changes = (
        ensure_topics(settings)
        + ensure_share_groups(settings)
        + ensure_schema(settings)
        + ensure_buckets(settings)
    )
    for change in changes:
        echo(change)
    echo(f"bootstrap: {len(changes)} change(s)" if changes else "bootstrap: everything already in place")
    return changes


def teardown(settings: Settings, echo: Callable[[str], None] = print) -> list[str]:
    """The reverse of `bootstrap` for a run of its own: delete every topic under its prefix (and the
    gatekeeper's faust-made topics, named after its app id) and drop its keyspace. Buckets are shared
    and stay. Never point it at settings other runs share: it deletes what it finds, data included."""
    admin = make_admin(settings)
    owned = (f"{settings.kafka.topic_prefix}.", f"{settings.gatekeeper.app_id}-")
    names = [n for n in admin.list_topics(timeout=ADMIN_TIMEOUT_S).topics if n.startswith(owned)]
    changes = []
    if names:
        for name, future in admin.delete_topics(names, operation_timeout=ADMIN_TIMEOUT_S).items():
            future.result()
            changes.append(f"topic {name}: deleted")
    cluster, session = connect(settings.cassandra)
    try:
        keyspace = settings.cassandra.keyspace
        if _schema_objects(session, keyspace):
            session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)
            changes.append(f"cassandra keyspace {keyspace}: dropped")
    finally:
        cluster.shutdown()
    for change in changes:
        echo(change)
    return changes
