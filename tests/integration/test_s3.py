"""The blob store against a real S3-compatible server: put, get, copy, presign and fetch over HTTP."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request

import pytest

from plumbing.blobs import BlobStore, frame_key, result_prefix
from plumbing.settings import Settings
from tests.conftest import unique


@pytest.fixture
def store(infra: Settings) -> BlobStore:
    return BlobStore(infra.s3)


def test_put_get_copy_presign(store: BlobStore):
    bucket = unique("b")
    assert store.ensure_bucket(bucket) is True
    assert store.ensure_bucket(bucket) is False
    data = bytes(range(256)) * 100
    blob = store.put(bucket, frame_key("acme", "r1", 3), data, "image/png")
    assert blob.key == "acme/r1/frames/00003.png"
    assert blob.sha256 == hashlib.sha256(data).hexdigest() and blob.bytes == len(data)
    assert store.get(bucket, blob.key) == data
    copied = store.copy(
        blob, bucket, result_prefix("acme", "r1", 1_795_000_000_000) + "image-0.png", "image/png"
    )
    assert copied.key == "acme/2026/11/18/r1/image-0.png"
    assert store.exists(bucket, copied.key) and not store.exists(bucket, "nope")

    url, expires_at = store.presign(bucket, copied.key, ttl_s=120)
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.read() == data
    assert expires_at > 0

    assert sorted(store.list_keys(bucket)) == sorted([blob.key, copied.key])
    store.delete(bucket, [blob.key])
    assert store.list_keys(bucket, "acme/r1/") == []


def test_missing_object_is_a_404(store: BlobStore):
    bucket = unique("b")
    store.ensure_bucket(bucket)
    url, _ = store.presign(bucket, "absent.png")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, timeout=10)
    assert err.value.code == 404
