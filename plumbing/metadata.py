"""Cassandra sessions with the pipeline's defaults (the metadata store).

Sessions are not bound to a keyspace: statements name ``<keyspace>.<table>`` in full, as Cassandra 5
asks of prepared statements. The ``output`` user type maps to `OutputRow`.
"""

from __future__ import annotations

import logging
import threading
from typing import NamedTuple

from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable, Session
from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy

from plumbing.backoff import Backoff
from plumbing.settings import CassandraSettings

log = logging.getLogger(__name__)
START_BACKOFF = Backoff(first_s=0.5, max_s=5.0, jitter=0.2)  # a stage starting while Cassandra is down


class OutputRow(NamedTuple):
    """One stored result, as the ``output`` user type in infra/cql/002_tables.cql."""

    kind: str
    bucket: str
    key: str
    content_type: str
    bytes: int
    sha256: str
    width: int
    height: int
    duration_ms: int | None = None
    frames: int | None = None
    fps: int | None = None


def connect(settings: CassandraSettings, connect_timeout_s: float = 5.0) -> tuple[Cluster, Session]:
    """A cluster and a session. Call ``cluster.shutdown()`` when done."""
    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=settings.local_dc)),
        request_timeout=settings.request_timeout_s,
    )
    auth = None
    if settings.username and settings.password:
        auth = PlainTextAuthProvider(settings.username, settings.password.get_secret_value())
    cluster = Cluster(
        list(settings.hosts),
        port=settings.port,
        protocol_version=5,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        auth_provider=auth,
        connect_timeout=connect_timeout_s,
    )
    session = cluster.connect()
    return cluster, session


def connect_when_up(
    settings: CassandraSettings, stop: threading.Event, backoff: Backoff = START_BACKOFF
) -> tuple[Cluster, Session] | None:
    """`connect`, tried again while no Cassandra host answers (a stage starting during an outage waits,
    not ready, instead of exiting to be restarted again and again); None once ``stop`` is set."""
    failures = 0
    while not stop.is_set():
        try:
            return connect(settings)
        except NoHostAvailable as exc:
            failures += 1
            delay = backoff.delay_s(failures)
            log.warning("Cassandra is not reachable (%s); trying again in %.1f s", exc, delay)
            stop.wait(delay)
    return None


def register_types(cluster: Cluster, keyspace: str) -> None:
    """Map the keyspace's user types to Python classes (call once the schema exists)."""
    cluster.register_user_type(keyspace, "output", OutputRow)
