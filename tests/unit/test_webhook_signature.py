"""Standard Webhooks signatures: the spec's published test vector, an independent HMAC, verification."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from schemas.records import Completion, Timings
from stream_processors.webhooks import signature
from stream_processors.webhooks.delivery import payload, webhook_id
from stream_processors.webhooks.signature import SignatureError


def completion() -> Completion:
    return Completion(
        request_id="r-1",
        tenant_id="t-1",
        status="SUCCEEDED",
        timings=Timings(),
        finished_at=1_800_000_000_000,
    )


def test_the_standard_webhooks_test_vector():
    # From the Standard Webhooks reference libraries' tests.
    assert (
        signature.sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            b'{"test": 2432232314}',
        )
        == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_a_signature_is_hmac_sha256_over_id_timestamp_and_body_with_the_decoded_secret():
    secret = signature.new_secret()
    body = payload(completion(), 1_800_000_000)
    headers = signature.headers(secret, webhook_id("r-1"), 1_800_000_000, body)
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, b"msg_r-1.1800000000." + body, hashlib.sha256).digest()
    assert headers == {
        "webhook-id": "msg_r-1",
        "webhook-timestamp": "1800000000",
        "webhook-signature": "v1," + base64.b64encode(mac).decode(),
    }


def test_new_secrets_are_whsec_base64_of_32_random_bytes():
    first, second = signature.new_secret(), signature.new_secret()
    assert first.startswith("whsec_") and first != second
    assert len(signature.secret_key(first)) == 32


def test_verify_accepts_the_signature_and_refuses_a_changed_body_secret_or_stale_timestamp():
    secret, body = signature.new_secret(), b'{"data":{}}'
    header = signature.sign(secret, "msg_1", 1000, body)
    signature.verify(secret, "msg_1", "1000", f"v1,bm9wZQ== {header}", body, now_s=1100)  # one of several
    with pytest.raises(SignatureError):
        signature.verify(secret, "msg_1", "1000", header, body + b" ", now_s=1000)
    with pytest.raises(SignatureError):
        signature.verify(signature.new_secret(), "msg_1", "1000", header, body, now_s=1000)
    with pytest.raises(SignatureError):
        signature.verify(secret, "msg_2", "1000", header, body, now_s=1000)
    with pytest.raises(SignatureError, match="more than"):
        signature.verify(secret, "msg_1", "1000", header, body, now_s=1000 + signature.TOLERANCE_S + 1)


@pytest.mark.parametrize("secret", ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_not base64!"])
def test_a_malformed_secret_is_a_typed_error(secret):
    with pytest.raises(SignatureError):
        signature.sign(secret, "msg_1", 1, b"{}")


def test_the_body_is_the_standard_webhooks_envelope_around_the_completion():
    body = payload(completion(), 1_800_000_000)
    assert body == (
        b'{"type":"generation.completed","timestamp":"2027-01-15T08:00:00Z",'
        b'"data":{"request_id":"r-1","tenant_id":"t-1","status":"SUCCEEDED","reason_code":null,'
        b'"message":null,"retry_after_ms":null,"moderation":null,"outputs":[],'
        b'"timings":{"queued_ms":0,"render_ms":0,"assemble_ms":0,"total_ms":0},"labels":{},'
        b'"created_at":0,"finished_at":1800000000000,"webhook_url":null}}'
    )
