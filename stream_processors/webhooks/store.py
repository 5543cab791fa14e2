"""The webhook tables (infra/cql/003_webhooks.cql): tenants' default endpoints and secrets, and which
completions have been delivered."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from cassandra.cluster import Session

from stream_processors.webhooks.signature import new_secret


@dataclass(frozen=True)
class Endpoint:
    """A tenant's webhook settings: its default URL (None: only requests' own URLs) and its secret."""

    tenant_id: str
    url: str | None
    secret: str | None

    @property
    def masked_secret(self) -> str:
        """The secret's first ten characters, for display; ``-`` when there is none."""
        return f"{self.secret[:10]}…" if self.secret else "-"


class WebhookStore:
    """The webhook tables' prepared statements: endpoints and secrets by tenant, deliveries by request."""

    def __init__(self, session: Session, keyspace: str) -> None:
        self.session = session
        ks = keyspace
        self._get = session.prepare(
            f"SELECT tenant_id, url, secret FROM {ks}.webhook_endpoints WHERE tenant_id = ?"
        )
        self._set_url = session.prepare(
            f"UPDATE {ks}.webhook_endpoints SET url = ?, updated_at = ? WHERE tenant_id = ?"
        )
        self._set_secret = session.prepare(
            f"UPDATE {ks}.webhook_endpoints SET secret = ?, updated_at = ? WHERE tenant_id = ?"
        )
        self._first_secret = session.prepare(
            f"INSERT INTO {ks}.webhook_endpoints (tenant_id, secret, updated_at) "
            "VALUES (?, ?, ?) IF NOT EXISTS"
        )
        self._delivered = session.prepare(f"SELECT status FROM {ks}.webhook_deliveries WHERE request_id = ?")
        self._mark = session.prepare(
            f"INSERT INTO {ks}.webhook_deliveries "
            "(request_id, tenant_id, url, status, attempts, delivered_at) VALUES (?, ?, ?, ?, ?, ?)"
        )

    def endpoint(self, tenant_id: str) -> Endpoint:
        """The tenant's webhook settings (no URL and no secret when it has no row)."""
        row = self.session.execute(self._get, (tenant_id,)).one()
        return Endpoint(tenant_id, row.url, row.secret) if row else Endpoint(tenant_id, None, None)

    def set_url(self, tenant_id: str, url: str | None) -> None:
        """Set (None: clear) the tenant's default URL."""
        self.session.execute(self._set_url, (url, datetime.now(UTC), tenant_id))

    def ensure_secret(self, tenant_id: str) -> str | None:
        """Create the tenant's secret if it has none; returns the new secret, or None if one existed."""
        secret = new_secret()
        applied = self.session.execute(self._first_secret, (tenant_id, secret, datetime.now(UTC))).was_applied
        if applied:
            return secret
        if self.endpoint(tenant_id).secret is None:  # a row with a URL but no secret yet
            self.session.execute(self._set_secret, (secret, datetime.now(UTC), tenant_id))
            return secret
        return None

    def rotate_secret(self, tenant_id: str) -> str:
        """A new secret replaces the old one at once (deliveries after this are signed with it)."""
        secret = new_secret()
        self.session.execute(self._set_secret, (secret, datetime.now(UTC), tenant_id))
        return secret

    def delivered(self, request_id: str) -> bool:
        """Whether the request's Completion was delivered (a 2xx answer was recorded)."""
        return self.session.execute(self._delivered, (request_id,)).one() is not None

    def mark_delivered(self, request_id: str, tenant_id: str, url: str, status: int, attempts: int) -> None:
        """Record the request's delivery: the URL, the 2xx status and the attempt that got it."""
        self.session.execute(self._mark, (request_id, tenant_id, url, status, attempts, datetime.now(UTC)))
