"""The webhook stage: Completions in, signed POSTs out (Standard Webhooks), failures to the retry topics.

Consumes ``aigc.completions`` and ``aigc.webhooks.redeliveries`` (consumer group ``<prefix>.webhooks``).
For each Completion it finds the URL (the request's ``webhook_url``, else its tenant's default from
``webhook_endpoints``; neither: nothing to do), skips it if ``webhook_deliveries`` says it was delivered,
checks the address (`addresses`: non-global addresses refused unless allowed), and POSTs the Completion
as JSON with ``webhook-id`` = ``msg_<request_id>`` (the same on every attempt), ``webhook-timestamp`` and
``webhook-signature`` (HMAC-SHA256 with the tenant's secret).

A 2xx answer is recorded in ``webhook_deliveries``. Anything else (an error status, no answer, a DNS
failure) is retryable: `route_failure` puts the Completion on ``aigc.retry.webhooks.<delay>`` with the
original topic set to ``aigc.webhooks.redeliveries``, so the relay (and ``aigc dlq replay``) sends it
back to this stage and never onto ``aigc.completions`` a second time. After ``retry.max_attempts`` it is
dead-lettered on ``aigc.dlq.webhooks`` with the HTTP status and the start of the answer's body. A refused
address (``WEBHOOK_ADDRESS_REFUSED``) or a tenant without a secret (``WEBHOOK_NO_SECRET``) is
dead-lettered at once.

Delivery: messages are handled one at a time and each offset is committed (synchronously) right after
its outcome is settled: the delivered row written, or the retry or dead letter acknowledged by the
broker (Cassandra trouble while writing the delivered row is waited out in place, never by a second
POST). A crash before that commit handles the message again, and the delivered row stops a second POST;
only a crash between a 2xx answer and that row's write (milliseconds) POSTs the same webhook-id twice,
which receivers drop by webhook-id as the Standard Webhooks spec asks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from datetime import UTC, datetime

from cassandra.cluster import Cluster, Session
from confluent_kafka import Message
from prometheus_client import Counter, Histogram

from plumbing import tracing
from plumbing.clock import now_ms
from plumbing.dead_letters import Original
from plumbing.errors import BackPressure, ErrorKind, PermanentError, RetryableError, classify
from plumbing.kafka_clients import make_consumer, make_producer, produce_sync
from plumbing.metadata import connect, connect_when_up
from plumbing.observability import LATENCY_BUCKETS, Readiness, enabled, serve
from plumbing.retries import prior_attempts, route_failure
from plumbing.settings import Settings
from plumbing.shutdown import stop_on_signals
from plumbing.topics import Stage, Topics
from schemas.codec import default_codec
from schemas.records import Completion
from stream_processors.webhooks import signature
from stream_processors.webhooks.addresses import AddressFilter
from stream_processors.webhooks.store import WebhookStore
from stream_processors.webhooks.transport import post

log = logging.getLogger(__name__)
POLL_S = 0.2
BACKPRESSURE_WAIT_S = 1.0
EVENT_TYPE = "generation.completed"
OUTCOMES = ("delivered", "retrying", "dead_lettered", "duplicate", "no_webhook")

DELIVERIES = Counter(
    "aigc_webhook_deliveries", "Completions the webhook stage handled, by outcome", ["outcome"]
)
POST_SECONDS = Histogram(
    "aigc_webhook_post_seconds", "Duration of one webhook POST (answered or not)", buckets=LATENCY_BUCKETS
)


class WebhookFailed(RetryableError):
    """The receiver did not answer 2xx (or at all); ``code`` names the status."""

    code = "WEBHOOK_FAILED"


class NoSecret(PermanentError):
    """The tenant has no webhook secret to sign with (`aigc webhooks set` or `rotate-secret` makes one)."""

    code = "WEBHOOK_NO_SECRET"


def payload(completion: Completion, timestamp_s: int) -> bytes:
    """The POST body: the Standard Webhooks envelope {type, timestamp, data} around the Completion (its
    fields in schema order, as JSON)."""
    envelope = {
        "type": EVENT_TYPE,
        "timestamp": datetime.fromtimestamp(timestamp_s, UTC).isoformat().replace("+00:00", "Z"),
        "data": completion.to_avro(),
    }
    return json.dumps(envelope, separators=(",", ":"), default=str).encode()


def webhook_id(request_id: str) -> str:
    """The ``webhook-id`` of a request's delivery: the same on every attempt, so receivers drop repeats."""
    return f"msg_{request_id}"


class Delivery:
    """The webhook stage: one consumer, one producer for retries and dead letters, the webhook tables."""

    def __init__(self, settings: Settings, cassandra: tuple[Cluster, Session] | None = None) -> None:
        """``cassandra``: a connection made already (`run` waits for Cassandra); else one is made here."""
        self.settings = settings
        self.topics = Topics(settings)
        self.codec = default_codec()
        self.filter = AddressFilter(settings.webhooks.allow_hosts)
        self.cluster, session = cassandra or connect(settings.cassandra)
        self.store = WebhookStore(session, settings.cassandra.keyspace)
        self.consumer = make_consumer(settings, f"{settings.kafka.topic_prefix}.webhooks", "webhooks")
        self.producer = make_producer(settings, "webhooks")
        self.readiness = Readiness()  # `run` gives it the process's (served on /readyz)
        self.stop = threading.Event()  # `run` gives it the process's

    def run(self, stop: threading.Event) -> None:
        """Deliver Completions one at a time until ``stop`` is set, committing each offset once settled."""
        self.stop = stop
        self.readiness.require("assigned")
        self.consumer.subscribe(
            [self.topics.completions, self.topics.webhook_redeliveries],
            on_assign=lambda *_: self.readiness.mark("assigned"),
        )
        try:
            while not stop.is_set():
                msg = self.consumer.poll(POLL_S)
                if msg is None or msg.error():
                    continue
                while not stop.is_set():
                    try:
                        self.handle(msg)
                        break
                    except BackPressure as exc:  # Cassandra down as a whole: wait, never dead-letter
                        log.warning("waiting: %s", exc)
                        stop.wait(BACKPRESSURE_WAIT_S)
                else:
                    return  # stopping in the middle: not committed, so handled again after the restart
                self.consumer.commit(message=msg, asynchronous=False)
        finally:
            self.producer.flush(30)
            self.consumer.close()
            self.cluster.shutdown()

    @tracing.spanned("webhooks.deliver", lambda _self, msg: msg.headers() or [])
    def handle(self, msg: Message) -> str:
        """Deliver, retry or dead-letter one message; returns the outcome (one of `OUTCOMES`)."""
        original = Original.of(msg)
        # Retries come back to this stage's own topic, never to aigc.completions.
        retry_as = dataclasses.replace(original, topic=self.topics.webhook_redeliveries)
        request_id = tenant_id = None
        try:
            completion = self.codec.read(msg.value(), Completion)
            request_id, tenant_id = completion.request_id, completion.tenant_id
            outcome = self.deliver(completion, prior_attempts(original) + 1)
        except Exception as exc:
            kind = classify(exc)
            if kind is ErrorKind.BACKPRESSURE:
                raise BackPressure(str(exc)) from exc
            routed = route_failure(
                self.codec, self.topics, self.settings.retry, Stage.WEBHOOKS, retry_as, exc, now_ms(),
                request_id, tenant_id,
            )  # fmt: skip
            assert routed is not None  # back-pressure was handled above
            produce_sync(self.producer, routed.topic, routed.value, routed.key, routed.headers)
            outcome = "dead_lettered" if routed.dead else "retrying"
            log.warning("%s %s: %s", outcome, request_id or original.coordinates, exc)
        tracing.annotate(outcome=outcome)
        if enabled():
            DELIVERIES.labels(outcome).inc()
        return outcome

    def deliver(self, completion: Completion, attempt: int) -> str:
        """POST ``completion`` (its ``attempt``-th try) unless it has no URL or was delivered; returns the
        outcome, or raises the failure to route (`WebhookFailed`, `NoSecret`, `AddressRefused`, ...)."""
        request_id, tenant_id = completion.request_id, completion.tenant_id
        endpoint = self.store.endpoint(tenant_id)
        url = completion.webhook_url or endpoint.url
        if not url:
            return "no_webhook"
        if self.store.delivered(request_id):
            return "duplicate"
        if not endpoint.secret:
            raise NoSecret(
                f"tenant {tenant_id!r} has no webhook secret; create one: aigc webhooks set {tenant_id}"
            )
        target = self.filter.check(url)
        timestamp = int(time.time())
        body = payload(completion, timestamp)
        try:
            headers = signature.headers(endpoint.secret, webhook_id(request_id), timestamp, body)
        except signature.SignatureError as exc:  # a secret not made by `aigc webhooks`
            raise NoSecret(
                f"tenant {tenant_id!r}: unusable webhook secret ({exc})", code="WEBHOOK_BAD_SECRET"
            ) from None
        started = time.perf_counter()
        try:
            answer = post(target, body, headers, self.settings.webhooks.timeout_s)
        except OSError as exc:
            raise WebhookFailed(f"no answer from {target.host}: {exc}", code="WEBHOOK_UNREACHABLE") from None
        finally:
            if enabled():
                POST_SECONDS.observe(time.perf_counter() - started)
        if not answer.ok:
            raise WebhookFailed(
                f"HTTP {answer.status} from {target.host}; body: {answer.excerpt}",
                code=f"WEBHOOK_HTTP_{answer.status}",
            )
        self._record(request_id, tenant_id, url, answer.status, attempt)
        log.info("delivered %s to %s (attempt %d)", request_id, target.host, attempt)
        return "delivered"

    def _record(self, request_id: str, tenant_id: str, url: str, status: int, attempt: int) -> None:
        """Write the delivered row, waiting out Cassandra trouble in place: going round again through
        `handle` (or a retry topic) would POST the delivered completion a second time."""
        while True:
            try:
                self.store.mark_delivered(request_id, tenant_id, url, status, attempt)
                return
            except Exception as exc:
                if classify(exc) not in (ErrorKind.BACKPRESSURE, ErrorKind.RETRYABLE) or self.stop.is_set():
                    raise
                log.warning("delivered %s, but its row is not written yet: %s", request_id, exc)
                self.stop.wait(BACKPRESSURE_WAIT_S)


def run(settings: Settings) -> None:
    """Run the webhook stage until SIGINT or SIGTERM."""
    stop = stop_on_signals()
    obs = serve(settings, "webhooks", "assigned")
    cassandra = connect_when_up(settings.cassandra, stop)
    if cassandra is None:  # stopped while waiting for Cassandra
        return
    delivery = Delivery(settings, cassandra)
    delivery.readiness = obs.readiness
    delivery.run(stop)
