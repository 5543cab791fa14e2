"""Is a service a command needs reachable? One TCP connect, answered in a couple of seconds.

A CLI verb that needs Kafka, Cassandra or S3 asks here first, so a person whose services are down gets
one clear line at once ("Kafka at 127.0.0.1:19092 is not reachable; start it with ...") instead of a
client library retrying and logging for half a minute. Reachable is not the same as healthy: a
service that accepts the connection and then misbehaves is left to the client's own errors.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from plumbing.errors import PipelineError
from plumbing.settings import Settings

CONNECT_TIMEOUT_S = 2.0
HOW_TO_START = "start it with `make run` or `aigc infra up`"
SERVICES = ("kafka", "cassandra", "s3")


class ServiceUnreachable(PipelineError):
    """A service a command needs does not accept connections; the message says which and where."""

    code = "SERVICE_UNREACHABLE"


def _addresses(settings: Settings, service: str) -> tuple[str, list[tuple[str, int]]]:
    """The service's display name and the (host, port) pairs any one of which is enough."""
    if service == "kafka":
        pairs = []
        for server in settings.kafka.bootstrap_servers.split(","):
            host, _, port = server.strip().rpartition(":")
            pairs.append((host.strip("[]") or "127.0.0.1", int(port)))
        return "Kafka", pairs
    if service == "cassandra":
        return "Cassandra", [(host, settings.cassandra.port) for host in settings.cassandra.hosts]
    if service == "s3":
        url = urlsplit(settings.s3.endpoint_url)
        default = 443 if url.scheme == "https" else 80
        return "S3", [(url.hostname or "127.0.0.1", url.port or default)]
    raise ValueError(f"unknown service {service!r}; known: {', '.join(SERVICES)}")


def reachable(host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
    """True when a TCP connection to ``host:port`` opens within ``timeout_s``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def require(settings: Settings, services: Iterable[str], timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise `ServiceUnreachable` for the first of ``services`` ("kafka", "cassandra", "s3") that
    accepts no connection on any of its addresses."""
    for service in services:
        name, pairs = _addresses(settings, service)
        if not any(reachable(host, port, timeout_s) for host, port in pairs):
            where = ",".join(f"{host}:{port}" for host, port in pairs)
            raise ServiceUnreachable(f"{name} at {where} is not reachable; {HOW_TO_START}")
