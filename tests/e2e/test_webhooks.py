"""Webhooks end to end: completions POSTed, signed, exactly once, retried, dead-lettered, refused.

One pipeline for the module with the webhook stage on (synthetic renderers), short retry delays and
127.0.0.1 allowed; a receiver on 127.0.0.1 (the standard library's http.server) verifies every signature
with its own HMAC computation and records every delivery. Its paths choose its answer: ``/ok`` 200,
``/flaky`` 500 the first time for each webhook-id then 200, ``/down`` always 500.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import signal
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.pipeline import RunningPipeline, running_pipeline
from plumbing.metadata import connect
from plumbing.settings import ModelSpec, OutputCheckSettings, RetrySettings, Settings, WebhookSettings
from plumbing.supervisor import Supervisor, free_port
from plumbing.topics import Stage, Topics
from producers.client import Client
from producers.dlq import Filters, replay
from producers.gateway.keys import KeyStore
from stream_processors.webhooks.store import WebhookStore
from tests.e2e.conftest import collect

DELIVERY_TIMEOUT_S = 60.0
QUIET_S = 2.0  # after the expected deliveries, this long with nothing new: no duplicate is on its way
RETRY = RetrySettings(delays_s=(0.5, 1.0), max_attempts=3)


@dataclass
class Receiver:
    """What the local receiver saw: every delivery, and every signature that failed to verify."""

    secrets: dict[str, str]  # tenant -> whsec_ secret
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: list[str] = field(default_factory=list)
    answered_500: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""
    recovered: bool = False  # /down answers 200 from now on

    def verified(self, headers: Any, body: bytes) -> dict[str, Any] | None:
        """The delivery if its signature verifies with its tenant's secret (an HMAC computed here,
        independently of the stage's code), else None."""
        webhook_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
        data = json.loads(body)["data"]
        secret = self.secrets.get(data["tenant_id"], "")
        key = base64.b64decode(secret.removeprefix("whsec_"))
        mac = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
        expected = "v1," + base64.b64encode(mac).decode()
        if expected not in headers["webhook-signature"].split() or abs(time.time() - int(timestamp)) > 300:
            return None
        return {"id": webhook_id, "request_id": data["request_id"], "status": data["status"]}

    def count(self, request_ids: set[str]) -> Counter[str]:
        with self.lock:
            return Counter(d["request_id"] for d in self.deliveries if d["request_id"] in request_ids)

    def wait_for(
        self, request_ids: set[str], timeout_s: float = DELIVERY_TIMEOUT_S, quiet_s: float = QUIET_S
    ) -> Counter[str]:
        """Deliveries of ``request_ids`` once each has one and ``quiet_s`` passed with nothing new."""
        deadline, last, quiet_since = time.monotonic() + timeout_s, None, time.monotonic()
        while time.monotonic() < deadline:
            seen = self.count(request_ids)
            if seen != last:
                last, quiet_since = seen, time.monotonic()
            elif set(seen) == request_ids and time.monotonic() - quiet_since >= quiet_s:
                break
            time.sleep(0.1)
        return self.count(request_ids)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rec = Receiver(secrets={})

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            delivery = rec.verified(self.headers, body)
            with rec.lock:
                if delivery is None:
                    rec.bad_signatures.append(self.headers.get("webhook-id", "?"))
                    code = 400
                elif (self.path == "/down" and not rec.recovered) or (
                    self.path == "/flaky" and not rec.answered_500[delivery["id"]]
                ):
                    rec.answered_500[delivery["id"]] += 1
                    code = 500
                else:
                    rec.deliveries.append({**delivery, "path": self.path})
                    code = 200
            reply = b"receiver says no" if code == 500 else b"ok"
            self.send_response(code)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rec.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield rec
    server.shutdown()


@pytest.fixture(scope="module")
def pipe(
    infra: Settings, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningPipeline]:
    settings = infra.model_copy(
        update={
            "home": tmp_path_factory.mktemp("webhooks"),
            "models": {"synth": ModelSpec(path=Path("/synthetic"), backend="synthetic")},
            "retry": RETRY,
            "webhooks": WebhookSettings(allow_hosts=("127.0.0.1",), timeout_s=5.0),
            # Output moderation has its own tests; off here, no renderer or sink loads the detector.
            "output_check": OutputCheckSettings(enabled=False),
            # The HTTP door too, for the request a client submits over HTTP (the last test).
            "gateway": infra.gateway.model_copy(update={"port": free_port(), "key_cache_s": 0.0}),
        }
    )
    with running_pipeline(
        settings, synthetic_ms=5.0, isolate="hooks", drop=True, webhooks=True, gateway=True
    ) as pipe:
        cluster, session = connect(pipe.settings.cassandra)
        store = WebhookStore(session, pipe.settings.cassandra.keyspace)
        for tenant in ("hooked", "hooked-default"):
            receiver.secrets[tenant] = store.ensure_secret(tenant) or ""
        store.set_url("hooked-default", f"{receiver.url}/ok")
        cluster.shutdown()
        yield pipe


Submit = Callable[..., set[str]]


@pytest.fixture(scope="module")
def submit(pipe: RunningPipeline) -> Iterator[Submit]:
    tag = uuid.uuid4().hex[:8]
    counter = iter(range(10_000))
    with Client(pipe.settings) as client:

        def send(n: int = 1, tenant_id: str = "hooked", **fields: Any) -> set[str]:
            base = dict(prompt="a signed lantern", model="synth", width=64, height=64, steps=2,
                        guidance_scale=7.5)  # fmt: skip
            return {
                client.submit(**base, **fields, tenant_id=tenant_id, request_id=f"wh-{tag}-{next(counter)}")
                for _ in range(n)
            }

        yield send


@pytest.fixture(scope="module")
def sent(receiver: Receiver, submit: Submit) -> dict[str, set[str]]:
    """Every scenario's requests, submitted at once at the start so that their retries run meanwhile."""
    return {
        "ok": submit(3, webhook_url=f"{receiver.url}/ok"),
        "default": submit(1, tenant_id="hooked-default"),  # no URL of its own: the tenant's default
        "flaky": submit(2, webhook_url=f"{receiver.url}/flaky"),
        "down": submit(1, webhook_url=f"{receiver.url}/down"),
        "private": submit(1, webhook_url="http://10.11.12.13:8080/hook"),  # not allowed: never connected to
        "no_secret": submit(1, tenant_id="unhooked", webhook_url="http://127.0.0.1:9/hook"),
    }


def dead_letters(settings: Settings, ids: set[str]) -> dict[str, dict[str, Any]]:
    found = collect(
        settings,
        [Topics(settings).dlq(Stage.WEBHOOKS)],
        lambda r: r["request_id"] in ids,
        lambda found: {r["request_id"] for r in found} >= ids,
        timeout_s=DELIVERY_TIMEOUT_S,
        idle_s=1.0,
    )
    by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for letter in found:
        by_id[letter["request_id"]].append(letter)
    assert all(len(letters) == 1 for letters in by_id.values()), by_id
    return {request_id: letters[0] for request_id, letters in by_id.items()}


def test_every_completion_is_delivered_once_signed_also_across_a_kill_of_the_stage(
    pipe: RunningPipeline, receiver: Receiver, submit: Submit, sent: dict[str, set[str]]
):
    first = sent["ok"] | sent["default"]
    settled = first | sent["flaky"]
    assert set(receiver.wait_for(settled, quiet_s=0)) == settled  # each counted exactly below
    # The other scenarios settle before the kill: a kill between a dead letter (or retry) and its offset's
    # commit repeats it after the restart (at-least-once, as in every stage), which their tests do not expect.
    (down,) = sent["down"]
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while receiver.answered_500[f"msg_{down}"] < RETRY.max_attempts and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # its dead letter and commit follow the last answer at once

    # SIGKILL the stage and let the supervisor restart it: what it delivered is not POSTed again, and
    # what completes meanwhile is delivered once after the restart.
    supervisor = pipe.supervisor
    supervisor.signal("webhooks", signal.SIGKILL)
    second = submit(2, webhook_url=f"{receiver.url}/ok")
    deadline = time.monotonic() + 30
    while supervisor.children["webhooks"].restarts == 0 and time.monotonic() < deadline:
        supervisor.poll()
        time.sleep(0.1)
    assert supervisor.wait_ready(60)
    assert receiver.wait_for(first | second) == dict.fromkeys(first | second, 1)
    assert receiver.bad_signatures == []
    assert {d["id"] for d in receiver.deliveries if d["request_id"] in first} == {f"msg_{i}" for i in first}


def test_a_failed_post_is_retried_and_then_delivered_once(receiver: Receiver, sent: dict[str, set[str]]):
    ids = sent["flaky"]
    assert receiver.wait_for(ids) == dict.fromkeys(ids, 1)
    assert all(receiver.answered_500[f"msg_{i}"] == 1 for i in ids)


def test_a_receiver_that_always_fails_ends_in_the_dead_letters_with_its_answer(
    pipe: RunningPipeline, receiver: Receiver, sent: dict[str, set[str]]
):
    ids = sent["down"]
    (letter,) = dead_letters(pipe.settings, ids).values()
    assert letter["error_code"] == "WEBHOOK_HTTP_500"
    assert letter["attempts"] == RETRY.max_attempts
    assert "HTTP 500" in letter["error_message"] and "receiver says no" in letter["error_message"]
    assert receiver.answered_500[f"msg_{letter['request_id']}"] == RETRY.max_attempts
    # The dead letter points back at the stage's own topic: a replay retries the webhook, not the completion.
    assert letter["original_topic"] == Topics(pipe.settings).webhook_redeliveries
    assert receiver.count(ids) == {}

    # The receiver is fixed: a replay of the dead letter delivers it once; a second replay sends nothing.
    receiver.recovered = True
    first = replay(pipe.settings, Filters(stages=["webhooks"], request_ids=ids), execute=True)
    assert [a.action for a in first.actions] == ["sent"]
    assert receiver.wait_for(ids) == dict.fromkeys(ids, 1)
    second = replay(pipe.settings, Filters(stages=["webhooks"], request_ids=ids), execute=True)
    assert [(a.action, a.why) for a in second.actions] == [("skip", "already finished (webhook delivered)")]


def test_refused_addresses_and_missing_secrets_get_a_typed_reason(
    pipe: RunningPipeline, sent: dict[str, set[str]]
):
    private, no_secret = sent["private"], sent["no_secret"]
    letters = dead_letters(pipe.settings, private | no_secret)
    assert {letters[i]["error_code"] for i in private} == {"WEBHOOK_ADDRESS_REFUSED"}
    assert {letters[i]["error_code"] for i in no_secret} == {"WEBHOOK_NO_SECRET"}
    assert all(letter["attempts"] == 1 for letter in letters.values())  # permanent: not retried


def test_a_malformed_webhook_url_is_rejected_by_the_gatekeeper(pipe: RunningPipeline):
    with Client(pipe.settings, known_models=None) as client:
        # The SDK validates too; a producer that does not is answered by the gatekeeper.
        request = {
            "request_id": f"wh-bad-{uuid.uuid4().hex[:8]}", "tenant_id": "hooked", "prompt": "a lantern",
            "model": "synth", "width": 64, "height": 64, "steps": 2, "guidance_scale": 7.5,
            "webhook_url": "ftp://hooks.example.com/aigc",
        }  # fmt: skip
        client._producer.produce(  # bypass client-side validation on purpose
            Topics(pipe.settings).requests("NORMAL"),
            client.codec.encode("GenerationRequest", _complete(request)),
            key=request["tenant_id"],
        )
        client._producer.flush(10)
    (completion,) = collect(
        pipe.settings,
        [Topics(pipe.settings).completions],
        lambda r: r["request_id"] == request["request_id"],
        bool,
        idle_s=1.0,
    )
    assert completion["status"] == "REJECTED" and completion["reason_code"] == "INVALID_WEBHOOK_URL"
    assert completion["webhook_url"] is None  # an invalid URL is never carried to the webhook stage


def _complete(request: dict[str, Any]) -> dict[str, Any]:
    from producers.client import new_request

    return new_request(**request).to_avro()


def test_the_stage_serves_readiness_and_its_delivery_metrics(
    pipe: RunningPipeline, receiver: Receiver, sent: dict[str, set[str]]
):
    import urllib.request

    assert set(receiver.wait_for(sent["ok"], quiet_s=0)) == sent["ok"]
    port = pipe.supervisor.children["webhooks"].port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
        assert response.status == 200 and json.loads(response.read())["stage"] == "webhooks"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    # Counted by this process (after the first test's restart: the completions delivered since).
    delivered = [
        line
        for line in text.splitlines()
        if line.startswith('aigc_webhook_deliveries_total{outcome="delivered"}')
    ]
    assert delivered and float(delivered[0].split()[-1]) >= 1, text
    assert "aigc_webhook_post_seconds_count" in text


def restarted(supervisor: Supervisor, stage: str, restarts: int) -> None:
    """Wait until the supervisor has started ``stage`` again after a kill, and it is ready."""
    deadline = time.monotonic() + 30
    while supervisor.children[stage].restarts == restarts and time.monotonic() < deadline:
        supervisor.poll()
        time.sleep(0.1)
    assert supervisor.children[stage].restarts > restarts, f"{stage} was not restarted"
    assert supervisor.wait_ready(60)


def test_a_request_submitted_over_http_is_delivered_once_across_a_gateway_and_a_stage_restart(
    pipe: RunningPipeline, receiver: Receiver
):
    """The client's POST is answered, then the gateway and the delivery stage both die; the client, not
    sure its request got in, POSTs it again with the same Idempotency-Key: one request, one delivery.
    Last in the module: the other scenarios are over, so the kills repeat nothing of theirs."""
    cluster, session = connect(pipe.settings.cassandra)
    try:
        _, key = KeyStore(session, pipe.settings.cassandra.keyspace).create("hooked")
    finally:
        cluster.shutdown()
    body = dict(prompt="a lantern over http", model="synth", width=64, height=64, steps=2,
                webhook_url=f"{receiver.url}/ok")  # fmt: skip
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": uuid.uuid4().hex}
    supervisor = pipe.supervisor
    url = f"http://127.0.0.1:{pipe.settings.gateway.port}"
    with httpx.Client(base_url=url, headers=headers, timeout=30.0) as http:
        first = http.post("/v1/generations", json=body)
        assert first.status_code == 202, first.text
        request_id = first.json()["id"]
        gateway_restarts = supervisor.children["gateway"].restarts
        webhooks_restarts = supervisor.children["webhooks"].restarts
        supervisor.signal("gateway", signal.SIGKILL)
        supervisor.signal("webhooks", signal.SIGKILL)
        restarted(supervisor, "gateway", gateway_restarts)
        restarted(supervisor, "webhooks", webhooks_restarts)
        again = http.post("/v1/generations", json=body)
        assert again.status_code == 202, again.text
        assert again.json()["id"] == request_id
    assert receiver.wait_for({request_id}) == {request_id: 1}
    assert receiver.bad_signatures == []
