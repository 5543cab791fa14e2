"""The SDK other services use: submit generation requests, follow them, wait for results, cancel.

`Client.submit` validates a request before it leaves the process (the error names the field at fault),
keys it by tenant, picks the request topic by priority and returns once the broker has acknowledged it.
`Client.subscribe` tails the completions and status topics, filtered by request ids or tenant;
`Client.wait` returns a request's `Completion`. The Client reads no offsets of its own: it consumes with
manual partition assignment, so any number of clients can follow the same topics. Records are the typed
classes of `schemas.records`: `new_request` builds a `GenerationRequest`, subscribers get `Completion` and
`StatusEvent` records.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaError, TopicPartition

from plumbing.clock import now_ms
from plumbing.errors import DecodeError, DeliveryError
from plumbing.headers import new_traceparent, pipeline_headers
from plumbing.kafka_clients import (
    make_consumer,
    make_producer,
    produce_sync,
    retry_transient,
    start_positions,
)
from plumbing.settings import Settings
from plumbing.topics import Topics
from plumbing.validation import validate_request
from schemas.codec import Codec, default_codec
from schemas.records import CancelRequest, Completion, GenerationRequest, StatusEvent, VideoSpec

__all__ = ["Client", "Event", "new_request", "now_ms", "retry_transient"]

POLL_S = 0.2
DEFAULT_WAIT_LOOKBACK_MS = 3600 * 1000


def _required(cls: type[Any]) -> dict[str, None]:
    """The fields of record class ``cls`` without a schema default, each None: a record built over these
    holds None where the caller left a required field out, so `validate_request` names it (as it names a
    field with a wrong value) instead of the constructor raising TypeError."""
    return {
        f.name: None
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }


_REQUEST_REQUIRED = _required(GenerationRequest)
_VIDEO_REQUIRED = _required(VideoSpec)


def new_request(**fields: Any) -> GenerationRequest:
    """A `GenerationRequest` of ``fields``, with a fresh request_id, created_at now and kind VIDEO when
    ``video`` is given (IMAGE otherwise); the schema's defaults fill the rest (NORMAL priority, one
    image, output format by kind).

    ``video`` may be a `VideoSpec` or a mapping of its fields. A required field left out is None, for
    `validate_request` to name; an unknown one raises TypeError.
    """
    video = fields.get("video")
    if isinstance(video, Mapping):
        fields["video"] = VideoSpec(**{**_VIDEO_REQUIRED, **video})
    filled: dict[str, Any] = {
        **_REQUEST_REQUIRED,
        "request_id": uuid.uuid4().hex,
        "kind": "VIDEO" if video else "IMAGE",
        "created_at": now_ms(),
    }
    return GenerationRequest(**{**filled, **fields})


@dataclass(frozen=True)
class Event:
    """A record `Client.subscribe` saw: a `Completion` or a `StatusEvent`, where and when it was appended."""

    #: "completion" for a Completion, "status" for a StatusEvent.
    kind: Literal["completion", "status"]
    record: Completion | StatusEvent
    #: The topic it was read from.
    topic: str
    #: The Kafka timestamp of the message, epoch ms.
    timestamp_ms: int

    @property
    def request_id(self) -> str:
        """The request the record is about."""
        return self.record.request_id


class Client:
    """A connection to the pipeline for one service: submits, cancels and follows generation requests.

    ``Client(settings)`` opens a Kafka producer (closed by `close`, or by leaving a ``with`` block); each
    `subscribe` or `wait` opens its own consumer for as long as it runs. ``known_models`` names the models
    `submit` accepts: () checks against the settings' model registry, None skips the check (the gatekeeper
    still makes it).

    Example::

        with Client(Settings.load()) as client:
            request_id = client.submit(tenant_id="acme", prompt="a lighthouse at dusk", model="tiny-sd",
                                       width=512, height=512, steps=20, guidance_scale=7.5)
            completion = client.wait(request_id)
            print(completion.status, [out.presigned_url for out in completion.outputs])
    """

    def __init__(
        self,
        settings: Settings,
        *,
        codec: Codec | None = None,
        known_models: Collection[str] | None = (),
    ) -> None:
        self.settings = settings
        self.topics = Topics(settings)
        self.codec = codec or default_codec()
        self._models = settings.models.keys() if known_models == () else known_models
        self._producer = make_producer(settings, "sdk")
        self._submitted: dict[str, int] = {}
        self._errors: list[DeliveryError] = []

    def _prepare(
        self, request: GenerationRequest | Mapping[str, Any] | None, fields: dict[str, Any]
    ) -> tuple[GenerationRequest, bytes]:
        if isinstance(request, GenerationRequest):
            record = dataclasses.replace(request, **fields) if fields else request
        else:
            record = new_request(**{**(request or {}), **fields})
        validate_request(record, self.settings.limits, self._models, self.topics.reply_prefix, now_ms())
        return record, self.codec.write(record)

    def submit(
        self,
        request: GenerationRequest | Mapping[str, Any] | None = None,
        /,
        timeout_s: float = 30.0,
        **fields: Any,
    ) -> str:
        """Validate, produce and wait for the broker's acknowledgement; returns the request_id.

        ``request`` is a `GenerationRequest` (see `new_request`) or a mapping of its fields; keyword
        ``fields`` are set on it (or make the whole request, as for `new_request`), e.g.
        ``webhook_url="https://hooks.example.com/aigc"`` to have the Completion POSTed there, signed with
        the tenant's webhook secret (README, Webhooks). Raises ValidationError (naming the field) before
        anything is sent, DeliveryError if the broker does not acknowledge in time.
        """
        record, value = self._prepare(request, fields)
        produce_sync(
            self._producer,
            self.topics.requests(record.priority),
            value,
            key=record.tenant_id,
            headers=pipeline_headers(record.request_id, record.tenant_id, new_traceparent()),
            timeout_s=timeout_s,
        )
        self._submitted[record.request_id] = record.created_at
        return record.request_id

    def submit_nowait(
        self, request: GenerationRequest | Mapping[str, Any] | None = None, /, **fields: Any
    ) -> str:
        """Validate and enqueue without waiting, as `submit` takes a request; returns the request_id.
        `flush` waits for every acknowledgement and raises the first delivery error (for high rates)."""
        record, value = self._prepare(request, fields)

        def delivered(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                self._errors.append(DeliveryError(f"{record.request_id}: {err.str()}"))

        while True:
            try:
                self._producer.produce(
                    self.topics.requests(record.priority),
                    value,
                    key=record.tenant_id,
                    headers=pipeline_headers(record.request_id, record.tenant_id, new_traceparent()),
                    on_delivery=delivered,
                )
                break
            except BufferError:  # the local queue is full: let librdkafka drain it
                self._producer.poll(0.05)
        self._producer.poll(0)
        self._submitted[record.request_id] = record.created_at
        return record.request_id

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for every `submit_nowait` acknowledgement; raise the first delivery error, if any."""
        if self._producer.flush(timeout_s):
            raise DeliveryError(f"messages still unacknowledged after {timeout_s} s")
        if self._errors:
            errors, self._errors = self._errors, []
            raise errors[0]

    def cancel(self, request_id: str, tenant_id: str, reason: str | None = None) -> None:
        """Ask every stage to stop work on ``request_id``; the request ends CANCELLED unless already done.

        ``tenant_id`` must be the request's owner (a cancellation naming another tenant is ignored);
        ``reason`` becomes the Completion's message. Returns once the broker has acknowledged it.
        """
        record = CancelRequest(
            request_id=request_id, tenant_id=tenant_id, reason=reason, requested_at=now_ms()
        )
        produce_sync(
            self._producer,
            self.topics.cancellations,
            self.codec.write(record),
            key=request_id,
            headers=pipeline_headers(request_id, tenant_id, new_traceparent()),
        )

    def subscribe(
        self,
        *,
        request_ids: Collection[str] | None = None,
        tenant_id: str | None = None,
        completions: bool = True,
        status: bool = True,
        since_ms: int | None = None,
        from_beginning: bool = False,
        timeout_s: float | None = None,
        extra_topics: Collection[str] = (),
    ) -> Iterator[Event]:
        """Yield completions and status events as they arrive, oldest first, as `Event`s.

        Only records of ``request_ids`` and of ``tenant_id`` are yielded, when given; ``extra_topics``
        (a reply topic) are read too. Starts at the end of the topics, at ``since_ms`` (a timestamp) or at
        the beginning; stops after ``timeout_s`` without a matching event (never, when None). Undecodable
        records, and records that are neither a Completion nor a StatusEvent, are skipped.
        """
        topics = [t for t, on in ((self.topics.completions, completions), (self.topics.status, status)) if on]
        topics += list(extra_topics)
        wanted = set(request_ids) if request_ids is not None else None
        consumer = make_consumer(self.settings, f"sdk-{uuid.uuid4().hex}", "sdk.subscribe")
        try:
            consumer.assign(self._start_positions(consumer, topics, since_ms, from_beginning))
            idle_since = time.monotonic()
            while timeout_s is None or time.monotonic() - idle_since < timeout_s:
                msg = consumer.poll(POLL_S)
                if msg is None or msg.error():
                    continue
                event = self._event(msg)
                if event is None:
                    continue
                if wanted is not None and event.request_id not in wanted:
                    continue
                if tenant_id is not None and event.record.tenant_id != tenant_id:
                    continue
                idle_since = time.monotonic()
                yield event
        finally:
            consumer.close()

    def _event(self, msg: Any) -> Event | None:
        """The `Event` of a consumed message; None for one that holds no Completion or StatusEvent."""
        try:
            record = self.codec.read_any(msg.value())
        except DecodeError:  # another producer's garbage is not this subscriber's problem
            return None
        topic, timestamp_ms = str(msg.topic()), msg.timestamp()[1]
        if isinstance(record, Completion):
            return Event("completion", record, topic, timestamp_ms)
        if isinstance(record, StatusEvent):
            return Event("status", record, topic, timestamp_ms)
        return None

    def _start_positions(
        self, consumer: Any, topics: list[str], since_ms: int | None, from_beginning: bool
    ) -> list[TopicPartition]:
        metadata = consumer.list_topics(timeout=10)
        partitions = [
            TopicPartition(topic, p, since_ms if since_ms is not None else OFFSET_END)
            for topic in topics
            for p in sorted(metadata.topics[topic].partitions)
        ]
        if from_beginning:
            return [TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING) for tp in partitions]
        if since_ms is None:
            return partitions
        return start_positions(consumer, partitions)

    def wait(self, request_id: str, timeout_s: float = 300.0, since_ms: int | None = None) -> Completion:
        """The `Completion` of ``request_id``; raises TimeoutError if none arrives within ``timeout_s``.

        Looks back to the request's submission time (or ``since_ms``, or an hour) so a result that came
        before the call is still found.
        """
        start = since_ms or self._submitted.get(request_id) or now_ms() - DEFAULT_WAIT_LOOKBACK_MS
        deadline = time.monotonic() + timeout_s
        for event in self.subscribe(
            request_ids=[request_id], status=False, since_ms=start - 1000, timeout_s=timeout_s
        ):
            if isinstance(event.record, Completion):
                return event.record
            if time.monotonic() > deadline:
                break
        raise TimeoutError(f"no completion for {request_id} within {timeout_s} s")

    def close(self) -> None:
        """Wait up to 10 s for the broker to acknowledge the messages still on their way (`submit_nowait`)."""
        self._producer.flush(10)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
