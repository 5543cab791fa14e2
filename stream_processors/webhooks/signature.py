"""Standard Webhooks signatures (https://www.standardwebhooks.com): secrets, signing and verifying.

A secret is ``whsec_`` followed by the base64 of 32 random bytes; the HMAC key is those bytes. A message
is signed over ``f"{webhook_id}.{webhook_timestamp}.{body}"`` with HMAC-SHA256, and the signature header
holds ``v1,<base64 of the MAC>`` (space-separated when several secrets sign during a rotation).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

PREFIX = "whsec_"
SECRET_BYTES = 32
TOLERANCE_S = 300  # how far a receiver should accept a timestamp from its own clock


class SignatureError(ValueError):
    """A signature that does not verify, or a malformed secret or header."""


def new_secret() -> str:
    """A fresh signing secret, ``whsec_<base64>``."""
    return PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of ``secret``: the base64-decoded part after ``whsec_``."""
    if not secret.startswith(PREFIX):
        raise SignatureError("a webhook secret starts with whsec_")
    try:
        return base64.b64decode(secret[len(PREFIX) :], validate=True)
    except ValueError as exc:
        raise SignatureError(f"the secret is not base64 after whsec_: {exc}") from None


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: ``v1,<base64 HMAC-SHA256>``."""
    content = f"{webhook_id}.{timestamp}.".encode() + body
    mac = hmac.new(secret_key(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers(secret: str, webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers of one delivery."""
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, webhook_id, timestamp, body),
    }


def verify(
    secret: str, webhook_id: str, timestamp: str, signature_header: str, body: bytes, now_s: int
) -> None:
    """Raise SignatureError unless one ``v1`` signature in the header matches and the timestamp is within
    `TOLERANCE_S` of ``now_s`` (what a receiver does; the tests use it)."""
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise SignatureError(f"webhook-timestamp {timestamp!r} is not unix seconds") from None
    if abs(now_s - sent_at) > TOLERANCE_S:
        raise SignatureError(f"webhook-timestamp {sent_at} is more than {TOLERANCE_S} s from now")
    expected = sign(secret, webhook_id, sent_at, body).encode()
    for candidate in signature_header.split():
        if candidate.startswith("v1,") and hmac.compare_digest(candidate.encode(), expected):
            return
    raise SignatureError("no v1 signature in webhook-signature matches")
