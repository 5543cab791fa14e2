"""The object store adapter (S3 or any S3-compatible server) used by renderers, the assembler and tools.

Keys are built by callers from validated ids only (see `frame_key`, `result_key`), never from raw text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from plumbing.clock import now_ms
from plumbing.metrics import instrument_s3
from plumbing.settings import S3Settings

if TYPE_CHECKING:
    from plumbing.call_counts import CallCounts


@dataclass(frozen=True)
class StoredBlob:
    """An object in S3: where it is, the SHA-256 of its bytes and their count."""

    bucket: str
    key: str
    sha256: str
    bytes: int

    @property
    def uri(self) -> str:
        """``s3://<bucket>/<key>``."""
        return f"s3://{self.bucket}/{self.key}"


def frame_key(tenant_id: str, request_id: str, frame_index: int, ext: str = "png") -> str:
    """Deterministic staging key of one rendered frame: a re-render overwrites the same object."""
    return f"{tenant_id}/{request_id}/frames/{frame_index:05d}.{ext}"


def result_prefix(tenant_id: str, request_id: str, created_at_ms: int) -> str:
    """``<tenant>/<yyyy>/<mm>/<dd>/<request_id>/`` of a request's final objects (date of created_at, UTC)."""
    day = datetime.fromtimestamp(created_at_ms / 1000, tz=UTC)
    return f"{tenant_id}/{day:%Y/%m/%d}/{request_id}/"


class BlobStore:
    """The S3 object store: puts, gets, copies, lists and deletes objects, and signs GET URLs."""

    def __init__(
        self, settings: S3Settings, max_connections: int = 32, counts: CallCounts | None = None
    ) -> None:
        """``counts``: where to count this store's S3 calls for the benchmark ledger (None: not counted)."""
        self.settings = settings
        self.counts = counts
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key.get_secret_value(),
            config=Config(
                s3={"addressing_style": "path"},
                signature_version="s3v4",
                retries={"max_attempts": 3, "mode": "standard"},
                max_pool_connections=max_connections,
                connect_timeout=5,
                read_timeout=30,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        if counts is not None:
            counts.count_s3(self.client)
        instrument_s3(self.client)

    def put(self, bucket: str, key: str, data: bytes, content_type: str) -> StoredBlob:
        """Store ``data`` at ``bucket``/``key`` with its SHA-256 in the object's metadata."""
        digest = hashlib.sha256(data).hexdigest()
        self.client.put_object(
            Bucket=bucket, Key=key, Body=data, ContentType=content_type, Metadata={"sha256": digest}
        )
        return StoredBlob(bucket, key, digest, len(data))

    def get(self, bucket: str, key: str) -> bytes:
        """The bytes of the object at ``bucket``/``key``."""
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def exists(self, bucket: str, key: str) -> bool:
        """Whether an object is at ``bucket``/``key``."""
        try:
            self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise
        return True

    def copy(self, src: StoredBlob, bucket: str, key: str, content_type: str) -> StoredBlob:
        """Copy ``src`` to ``bucket``/``key`` inside S3 (no bytes pass through here) as ``content_type``."""
        self.client.copy_object(
            Bucket=bucket,
            Key=key,
            CopySource={"Bucket": src.bucket, "Key": src.key},
            ContentType=content_type,
            Metadata={"sha256": src.sha256},
            MetadataDirective="REPLACE",
        )
        return StoredBlob(bucket, key, src.sha256, src.bytes)

    def presign(self, bucket: str, key: str, ttl_s: int | None = None) -> tuple[str, int]:
        """A GET URL for the object and the epoch ms when it expires."""
        ttl = ttl_s or self.settings.presign_ttl_s
        if self.counts is not None:
            self.counts.add("s3 calls", "presign (signed locally, nothing sent)")
        url = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=ttl
        )
        return url, now_ms() + ttl * 1000

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key in ``bucket`` that starts with ``prefix``."""
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return keys

    def delete(self, bucket: str, keys: list[str]) -> None:
        """Delete ``keys`` from ``bucket``, a thousand per call; a key already gone is not an error."""
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            self.client.delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True}
            )

    def ensure_bucket(self, bucket: str) -> bool:
        """Create ``bucket`` if it is missing; True when it was created now."""
        try:
            self.client.head_bucket(Bucket=bucket)
            return False
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                raise
        try:
            self.client.create_bucket(Bucket=bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                return False
            raise
        return True
