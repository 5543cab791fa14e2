"""Cassandra sessions with the pipeline's defaults (the metadata store)."""

from __future__ import annotations

from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy

from plumbing.settings import CassandraSettings


def connect(settings: CassandraSettings, keyspace: str | None = None) -> tuple[Cluster, Session]:
    """A cluster and a session, bound to ``keyspace`` when given. Call ``cluster.shutdown()`` when done."""
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
        connect_timeout=5,
    )
    return cluster, cluster.connect(keyspace)
