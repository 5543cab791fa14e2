"""What the gatekeeper does with one consumed request, as a pure function of the message and table state.

Consumes: a message from ``aigc.requests.<priority>`` (raw bytes and headers), the ``seen`` entry of its
request_id and the rate-limit state of its tenant. Produces an `Admission`: the messages to send and the
table entries to store; the faust agent only carries them out. In order:

1. decode: undecodable bytes are dead-lettered untouched (``aigc.dlq.gatekeeper``), and so is a request
   whose request_id is not a valid id (it could not be answered or recorded under it);
2. dedupe: a request_id seen within the window at another offset is dropped (no second result); the same
   offset seen again is a redelivery after a crash and is decided again, with the decision it had;
3. validate: bounds, ids, model; a broken rule is REJECTED with a reason code naming the field;
4. cancelled before admission -> CANCELLED; past its deadline -> EXPIRED;
5. moderate the prompt, negative prompt and video end prompt -> REJECTED / MODERATED;
6. shed load: the request's class has more render work waiting than its bound -> REJECTED / OVERLOADED
   with a retry-after (`backlog`); the tenant already has its cap of unfinished tasks in the class ->
   REJECTED / TENANT_BUSY (`inflight`);
7. per-tenant token buckets for requests and render cost -> REJECTED / RATE_LIMITED with a retry-after;
8. fan out into render tasks on ``aigc.render.<pool>.<priority>`` and announce ACCEPTED and QUEUED.

Terminal decisions (steps 3-7) are Completion records sent to ``aigc.decisions.<priority>``, not to the
completions topic: the sink writes every terminal state once (a Cassandra lightweight transaction) and
publishes the Completion in a Kafka transaction, so a gatekeeper that crashes after sending a rejection
and before committing its offset cannot cause a second completion.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from plumbing.dead_letters import Failure, Original, dead_letter
from plumbing.errors import DecodeError, ValidationError
from plumbing.headers import REPLY_TOPIC, Headers, continue_headers
from plumbing.settings import RequestLimits, Settings, Tier
from plumbing.topics import Stage, Topics
from schemas.codec import Codec
from plumbing.validation import FUTURE_SKEW_MS, ID_PATTERN, render_cost, validate_request
from stream_processors.gatekeeper import ratelimit
from stream_processors.gatekeeper.fanout import plan_tasks, task_count
from stream_processors.gatekeeper.inflight import BUSY_RETRY_AFTER_MS
from stream_processors.gatekeeper.moderation import Moderator

MAX_MESSAGE_CHARS = 1000  # longest human-readable message a decision carries


@dataclass(frozen=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes
    headers: Headers
    partition: int | None = None  # None: the key's partition


def task_partitions(request_id: str, tasks: int, partitions: int) -> list[int | None]:
    """Partitions for a request's render tasks: spread evenly over the topic from a stable start.

    The key stays the request id (the contract), but the tasks of one request must not share its
    partition: a partition has one consumer in the group, so a video's frame ranges would render one
    after another on one renderer instead of side by side on many. The tasks are spaced
    ``partitions / tasks`` apart rather than next to each other because the renderers' range assignor
    hands each member a contiguous run of partitions. A lone task keeps the key's partition.
    """
    if tasks == 1:
        return [None]
    start, stride = zlib.crc32(request_id.encode()) % partitions, max(1, partitions // tasks)
    return [(start + i * stride) % partitions for i in range(tasks)]


@dataclass
class Admission:
    verdict: str  # ACCEPTED, REJECTED, CANCELLED, EXPIRED, DUPLICATE, DEAD_LETTERED
    outputs: list[Output] = field(default_factory=list)
    seen: dict[str, Any] | None = None  # new entry for the request_id, when it is to be stored
    bucket: dict[str, float] | None = None  # new token-bucket state for the tenant
    reason: str | None = None
    request_id: str | None = None
    tenant_id: str | None = None
    tasks: int = 0  # render tasks queued (ACCEPTED)
    priority: str | None = None  # the class they were queued in (ACCEPTED)


class Gate:
    def __init__(
        self,
        settings: Settings,
        codec: Codec,
        moderator: Moderator,
        is_cancelled: Callable[[str, str], bool] = lambda request_id, tenant_id: False,
        overloaded: Callable[[str, str], int | None] = lambda pool, priority: None,
        busy: Callable[[str, str, int], bool] = lambda tenant_id, priority, tasks: False,
        tier_of: Callable[[str], Tier] | None = None,  # a tenant's quotas (default: its tier in settings)
    ) -> None:
        self.settings = settings
        self.codec = codec
        self.moderator = moderator
        self.is_cancelled = is_cancelled
        self.overloaded = overloaded
        self.busy = busy
        self.tier_of = tier_of or settings.gatekeeper.tier_of
        self.topics = Topics(settings)
        self.window_ms = int(settings.gatekeeper.dedupe_window_s * 1000)

    def admit(
        self,
        original: Original,
        seen: Mapping[str, Any],
        buckets: Mapping[str, Any],
        now_ms: int,
    ) -> Admission:
        try:
            request = self.codec.decode(original.value, "GenerationRequest")
            if not ID_PATTERN.fullmatch(request["request_id"]):
                # Its id would key the Completion, the Cassandra row and the S3 keys: a request that has
                # no usable id cannot be answered, so it goes to the operators, bytes intact.
                raise ValidationError(
                    "request_id",
                    "must match ^[A-Za-z0-9_-]{1,64}$; the request cannot be answered under this id",
                    code="INVALID_REQUEST_ID",
                )
        except (DecodeError, ValidationError) as exc:
            dlq = self.topics.dlq(Stage.GATEKEEPER)
            value, headers = dead_letter(
                self.codec, original, Failure.of(Stage.GATEKEEPER, exc, 1, now_ms, now_ms), topic=dlq
            )
            return Admission(
                "DEAD_LETTERED",
                [Output(dlq, original.key, value, headers)],
                reason=exc.code,
            )

        request_id, tenant_id = request["request_id"], request["tenant_id"]
        origin = original.origin
        memo = seen.get(request_id) if ID_PATTERN.fullmatch(request_id) else None
        if memo and memo["o"] != origin and now_ms - memo["t"] < self.window_ms:
            return Admission("DUPLICATE", request_id=request_id, tenant_id=tenant_id)
        # The same offset again is a redelivery after a crash: replay the decision it had, unchanged.
        replay = memo if memo and memo["o"] == origin else None
        first_seen = replay["t"] if replay else now_ms
        incoming = dict(original.headers)
        if replay is not None and replay["d"] == "A":
            return self._accept(request, incoming, origin, first_seen, now_ms, None)
        decision, bucket = (
            (replay["x"], None) if replay is not None else self._check(request, buckets, now_ms)
        )
        if decision is None:
            return self._accept(request, incoming, origin, first_seen, now_ms, bucket)
        return self._reject(request, incoming, origin, first_seen, now_ms, decision)

    def _check(
        self, request: dict[str, Any], buckets: Mapping[str, Any], now_ms: int
    ) -> tuple[dict[str, Any] | None, dict[str, float] | None]:
        """Steps 3-7: a terminal decision, or None and the tenant's new token-bucket state."""
        request_id, tenant_id = request["request_id"], request["tenant_id"]
        try:
            validate_request(
                request, self.settings.limits, self.settings.models.keys(), self.topics.reply_prefix, now_ms
            )
        except ValidationError as exc:
            return _decision("REJECTED", exc.code, str(exc), validated=False), None
        if self.is_cancelled(request_id, tenant_id):
            return _decision("CANCELLED", "CANCELLED", "cancelled before it was admitted"), None
        if request.get("deadline_ms") is not None and request["deadline_ms"] <= now_ms:
            return _decision(
                "EXPIRED", "DEADLINE_EXCEEDED", "the deadline passed before it was admitted"
            ), None
        video = request.get("video") or {}
        verdict = self.moderator.check(
            {
                "prompt": request["prompt"],
                "negative_prompt": request.get("negative_prompt"),
                "video.prompt_end": video.get("prompt_end"),
            }
        )
        if not verdict.allowed:
            moderation = {
                "category": verdict.category or "",
                "policy_version": verdict.policy_version,
                "source": verdict.source,
                "field": verdict.field or "prompt",
                "reason": verdict.reason,
                "model_version": verdict.model_version,
                "score": verdict.score,
                "scores": dict(verdict.scores),
            }
            message = f"{verdict.field} was blocked by the content policy ({verdict.category})"
            return _decision("REJECTED", "MODERATED", message, moderation=moderation), None
        pool, priority = self.settings.models[request["model"]].pool, request.get("priority") or "NORMAL"
        retry_after = self.overloaded(pool, priority)
        if retry_after is not None:
            message = f"the {priority} queue of pool {pool} is over its bound; retry later"
            return _decision("REJECTED", "OVERLOADED", message, retry_after_ms=retry_after), None
        if self.busy(tenant_id, priority, task_count(request, self.settings.gatekeeper.frames_per_task)):
            message = f"the tenant has as much {priority} work in flight as it may; retry when some finishes"
            return _decision("REJECTED", "TENANT_BUSY", message, retry_after_ms=BUSY_RETRY_AFTER_MS), None
        taken = ratelimit.take(buckets.get(tenant_id), self.tier_of(tenant_id), render_cost(request), now_ms)
        if taken.reason == "COST_EXCEEDS_TIER":
            message = "the request costs more than the tenant's tier allows at once"
            return _decision("REJECTED", "COST_EXCEEDS_TIER", message), None
        if not taken.allowed:
            message = "the tenant is over its rate limit; retry later"
            return _decision("REJECTED", "RATE_LIMITED", message, retry_after_ms=taken.retry_after_ms), None
        return None, taken.state

    def _reject(
        self,
        request: dict[str, Any],
        incoming: Mapping[str, bytes | None],
        origin: str,
        first_seen: int,
        now_ms: int,
        decision: dict[str, Any],
    ) -> Admission:
        """A terminal decision, sent to the sink as a Completion on the decisions topic."""
        request_id, tenant_id = request["request_id"], request["tenant_id"]
        created_at = _echoed_created_at(request.get("created_at"), now_ms)
        completion = {
            "request_id": request_id,
            "tenant_id": tenant_id,
            "status": decision["status"],
            "reason_code": decision["reason_code"],
            "message": decision["message"],
            "retry_after_ms": decision.get("retry_after_ms"),
            "moderation": decision.get("moderation"),
            "outputs": [],
            "timings": {
                "queued_ms": 0,
                "render_ms": 0,
                "assemble_ms": 0,
                "total_ms": max(0, now_ms - created_at) if created_at else 0,
            },
            "labels": _echoed_labels(request.get("labels"), self.settings.limits),
            "created_at": created_at,
            "finished_at": now_ms,
            "webhook_url": request.get("webhook_url") if decision["validated"] else None,
        }
        headers = continue_headers(incoming, request_id, tenant_id)
        if decision["validated"] and request.get("reply_topic"):
            headers.append((REPLY_TOPIC, request["reply_topic"].encode()))
        out = Output(
            self.topics.decisions(request.get("priority") or "NORMAL"),
            request_id.encode(),
            self.codec.encode("Completion", completion),
            headers,
        )
        store = (
            {"o": origin, "t": first_seen, "d": "R", "x": decision}
            if ID_PATTERN.fullmatch(request_id)
            else None
        )
        return Admission(
            decision["status"],
            [out],
            seen=store,
            reason=decision["reason_code"],
            request_id=request_id,
            tenant_id=tenant_id,
        )

    def _accept(
        self,
        request: dict[str, Any],
        incoming: Mapping[str, bytes | None],
        origin: str,
        first_seen: int,
        now_ms: int,
        bucket: dict[str, float] | None,
    ) -> Admission:
        request_id, tenant_id = request["request_id"], request["tenant_id"]
        spec = self.settings.models[request["model"]]
        tasks = plan_tasks(request, spec.pool, self.settings.gatekeeper.frames_per_task, now_ms, now_ms)
        topic = self.topics.render(spec.pool, request.get("priority") or "NORMAL")
        key = request_id.encode()
        outputs = [self._status(request, "ACCEPTED", incoming, now_ms)]
        partitions = task_partitions(request_id, len(tasks), self.settings.kafka.render_partitions)
        outputs += [
            Output(
                topic,
                key,
                self.codec.encode("RenderTask", task),
                continue_headers(incoming, request_id, tenant_id),
                partition,
            )
            for task, partition in zip(tasks, partitions, strict=True)
        ]
        outputs.append(self._status(request, "QUEUED", incoming, now_ms, f"{len(tasks)} task(s) on {topic}"))
        return Admission(
            "ACCEPTED",
            outputs,
            seen={"o": origin, "t": first_seen, "d": "A"},
            bucket=bucket,
            request_id=request_id,
            tenant_id=tenant_id,
            tasks=len(tasks),
            priority=request.get("priority") or "NORMAL",
        )

    def _status(
        self,
        request: dict[str, Any],
        state: str,
        incoming: Mapping[str, bytes | None],
        now_ms: int,
        message: str | None = None,
    ) -> Output:
        record = {
            "request_id": request["request_id"],
            "tenant_id": request["tenant_id"],
            "stage": Stage.GATEKEEPER.value,
            "state": state,
            "progress": None,
            "task_id": None,
            "worker_id": None,
            "message": message,
            "at": now_ms,
        }
        return Output(
            self.topics.status,
            request["request_id"].encode(),
            self.codec.encode("StatusEvent", record),
            continue_headers(incoming, request["request_id"], request["tenant_id"]),
        )


def _echoed_labels(labels: Any, limits: RequestLimits) -> dict[str, str]:
    """The request's labels as its Completion echoes them: all of them when they keep the request limits,
    none otherwise. A rejected request's labels may never have been checked, and megabytes of them would
    make a decision larger than the gatekeeper's producer sends (about 1 MB: the worker crashes on it)."""
    labels = labels or {}
    if len(labels) > limits.max_labels or any(
        len(k) > limits.max_label_chars or len(v) > limits.max_label_chars for k, v in labels.items()
    ):
        return {}
    return dict(labels)


def _echoed_created_at(value: Any, now_ms: int) -> int:
    """The request's created_at as its Completion echoes it, or 0 when it is not a plausible epoch-ms time.

    A rejected request's created_at may never have been checked (validation stops at the first broken
    rule), and an absurd one (negative, years ahead) would overflow ``total_ms`` (an Avro long) here or a
    Cassandra timestamp in the sink, crashing the stage instead of answering the request.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= now_ms + FUTURE_SKEW_MS:
        return 0
    return value


def _decision(status: str, reason: str, message: str, validated: bool = True, **extra: Any) -> dict[str, Any]:
    """A terminal decision as stored in the ``seen`` entry, so a redelivery can replay it.

    The message is cut to MAX_MESSAGE_CHARS: some validation messages quote the offending value, which
    may be megabytes long (a scheduler name), and the decision must stay small enough to send."""
    message = message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 1] + "…"
    return {"status": status, "reason_code": reason, "message": message, "validated": validated, **extra}
