"""API keys: one tenant per key, stored hashed in ``<keyspace>.api_keys`` (infra/cql/003_gateway.cql).

A key reads ``aigc_<key_id>_<secret>``: ``key_id`` (12 hex digits) names the row, ``secret`` is 32 random
bytes (URL-safe base64). Only the SHA-256 of the whole key is stored; `KeyStore.authenticate` fetches the
row by ``key_id`` and compares digests with `hmac.compare_digest`, so neither the table nor the timing of a
comparison gives the key away. The tenant a request acts for comes from its key and nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from plumbing.errors import PermanentError

KEY_PATTERN = re.compile(r"aigc_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
TENANT_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


class KeyError_(PermanentError):
    """An API key that is malformed, unknown or revoked (the caller learns only that it is not valid)."""


@dataclass(frozen=True)
class ApiKey:
    """A key's record (never the key itself): whose it is, what it may do, whether it is revoked."""

    key_id: str
    tenant_id: str
    label: str
    operator: bool
    created_at: datetime | None
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        """Whether the key still works (it is not revoked)."""
        return self.revoked_at is None


def digest(key: str) -> str:
    """The SHA-256 (hex) of ``key``: what the store keeps and compares instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh (key_id, key)."""
    key_id = secrets.token_hex(6)
    return key_id, f"aigc_{key_id}_{secrets.token_urlsafe(32)}"


def _row(row: Any) -> ApiKey:
    return ApiKey(
        row.key_id, row.tenant_id, row.label or "", bool(row.operator), row.created_at, row.revoked_at
    )


class KeyStore:
    """Create, list, revoke and check keys; ``cache_s`` bounds how long a checked key is trusted."""

    def __init__(self, session: Any, keyspace: str, cache_s: float = 5.0) -> None:
        self.session = session
        self.cache_s = cache_s
        self._by_id = session.prepare(
            f"SELECT key_id, tenant_id, key_sha256, label, operator, created_at, revoked_at "
            f"FROM {keyspace}.api_keys WHERE key_id = ?"
        )
        self._insert = session.prepare(
            f"INSERT INTO {keyspace}.api_keys (key_id, tenant_id, key_sha256, label, operator, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?) IF NOT EXISTS"
        )
        self._revoke = session.prepare(
            f"UPDATE {keyspace}.api_keys SET revoked_at = ? WHERE key_id = ? IF EXISTS"
        )
        self._all = (
            f"SELECT key_id, tenant_id, label, operator, created_at, revoked_at FROM {keyspace}.api_keys"
        )
        self._cache: dict[str, tuple[float, ApiKey]] = {}
        self._lock = threading.Lock()

    def create(self, tenant_id: str, label: str = "", operator: bool = False) -> tuple[ApiKey, str]:
        """A new key for ``tenant_id``: the record and the key itself (shown once, never stored)."""
        if not TENANT_PATTERN.fullmatch(tenant_id):
            raise ValueError(f"tenant {tenant_id!r} must match ^[A-Za-z0-9_-]{{1,64}}$")
        while True:  # a key_id already taken (48 random bits: practically never) draws another
            key_id, key = new_key()
            now = datetime.now(UTC)
            row = (key_id, tenant_id, digest(key), label, operator, now)
            if self.session.execute(self._insert, row).one()[0]:
                return ApiKey(key_id, tenant_id, label, operator, now, None), key

    def list(self, tenant_id: str | None = None) -> list[ApiKey]:
        """Every key's record (of ``tenant_id`` only, when given), by tenant then key id."""
        keys = [_row(r) for r in self.session.execute(self._all)]
        return sorted(
            (k for k in keys if tenant_id in (None, k.tenant_id)), key=lambda k: (k.tenant_id, k.key_id)
        )

    def revoke(self, key_id: str) -> bool:
        """Revoke ``key_id``; False when there is no such key."""
        applied = self.session.execute(self._revoke, (datetime.now(UTC), key_id)).one()
        with self._lock:
            self._cache.clear()
        return bool(applied[0])

    def cached(self, key: str) -> ApiKey | None:
        """The record of ``key`` if it was authenticated within ``cache_s`` (no query), else None."""
        cached = self._cache.get(digest(key))  # a dict read is atomic: no lock
        if cached is not None and time.monotonic() - cached[0] < self.cache_s:
            return cached[1]
        return None

    def authenticate(self, key: str) -> ApiKey:
        """The active key record ``key`` belongs to; raises `KeyError_` otherwise (asks Cassandra)."""
        now = time.monotonic()
        match = KEY_PATTERN.fullmatch(key)
        if match is None:
            raise KeyError_("the API key is malformed")
        row = self.session.execute(self._by_id, (match.group(1),)).one()
        if row is None or not hmac.compare_digest(row.key_sha256 or "", digest(key)):
            raise KeyError_("the API key is not valid")
        if row.revoked_at is not None:
            raise KeyError_("the API key has been revoked")
        record = _row(row)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest(key)] = (now, record)
        return record
