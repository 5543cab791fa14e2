"""A rejected request's tenant id as the terminal row stores it: escaped, reversible, valid ids unchanged."""

from __future__ import annotations

from urllib.parse import unquote

import pytest

from plumbing.validation import ID_PATTERN
from stream_processors.assembler.store import stored_tenant_id

BAD_TENANTS = ["%", "tenant:*", "del\x7f", "\U0010ffff", "", "../x", "a/b", "%41", "x" * 65, "é\x00\n"]


@pytest.mark.parametrize("tenant", BAD_TENANTS)
def test_bad_tenant_ids_are_stored_escaped_and_come_back_exactly(tenant: str):
    stored = stored_tenant_id(tenant)
    assert stored is not None and stored.isascii() and stored.isprintable()
    assert not any(c in stored for c in "/:*\x7f ")
    assert unquote(stored) == tenant
    assert not ID_PATTERN.fullmatch(stored)  # still not a tenant anything is stored under


@pytest.mark.parametrize("tenant", ["acme", "tenant-1_B", "x" * 64])
def test_valid_tenant_ids_are_stored_as_they_are(tenant: str):
    assert stored_tenant_id(tenant) == tenant


def test_no_tenant_stays_none():
    assert stored_tenant_id(None) is None
