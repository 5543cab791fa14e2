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

from plumbing.dead_letters import Failure, Original, dead_letter
from plumbing.errors import DecodeError, ValidationError
from plumbing.headers import REPLY_TOPIC, Outgoing, continue_headers
from plumbing.settings import RequestLimits, Settings, Tier
from plumbing.topics import Stage, Topics
from plumbing.validation import FUTURE_SKEW_MS, ID_PATTERN, render_cost, validate_request
from schemas.codec import Codec
from schemas.records import (
    Completion,
    CompletionStatus,
    GenerationRequest,
    ModerationVerdict,
    RequestState,
    StatusEvent,
    Timings,
)
from stream_processors.gatekeeper import ratelimit
from stream_processors.gatekeeper.fanout import plan_tasks, task_count
from stream_processors.gatekeeper.inflight import BUSY_RETRY_AFTER_MS
from stream_processors.gatekeeper.moderation import Moderator
from stream_processors.gatekeeper.tables import Bucket, Decision, Seen

MAX_MESSAGE_CHARS = 1000  # longest human-readable message a decision carries


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
    """What `Gate.admit` decided for one message: the messages to send and the table entries to store."""

    verdict: str  # ACCEPTED, REJECTED, CANCELLED, EXPIRED, DUPLICATE, DEAD_LETTERED (RETRYING: app.py)
    outputs: list[Outgoing] = field(default_factory=list)
    seen: Seen | None = None  # new entry for the request_id, when it is to be stored
    bucket: Bucket | None = None  # new token-bucket state for the tenant
    reason: str | None = None
    request_id: str | None = None
    tenant_id: str | None = None
    tasks: int = 0  # render tasks queued (ACCEPTED)
    priority: str | None = None  # the class they were queued in (ACCEPTED)


class Gate:
    """The admission rules of the gatekeeper, with the outside state they consult passed in as callables."""

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
        seen: Mapping[str, Seen],
        buckets: Mapping[str, Bucket],
        now_ms: int,
    ) -> Admission:
        """Decide one consumed request (steps 1-8 of the module's docstring) from the tables' state."""
        try:
            request = self.codec.read(original.value, GenerationRequest)
            if not ID_PATTERN.fullmatch(request.request_id):
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
            return Admission("DEAD_LETTERED", [Outgoing(dlq, original.key, value, headers)], reason=exc.code)

        request_id, tenant_id = request.request_id, request.tenant_id
        origin = original.origin
        memo = seen.get(request_id)
        if memo and memo.origin != origin and now_ms - memo.first_seen < self.window_ms:
            return Admission("DUPLICATE", request_id=request_id, tenant_id=tenant_id)
        # The same offset again is a redelivery after a crash: replay the decision it had, unchanged.
        replay = memo if memo and memo.origin == origin else None
        first_seen = replay.first_seen if replay else now_ms
        incoming = dict(original.headers)
        if replay is not None and replay.decision is None:
            return self._accept(request, incoming, origin, first_seen, now_ms, None)
        decision, bucket = (
            (replay.decision, None) if replay is not None else self._check(request, buckets, now_ms)
        )
        if decision is None:
            return self._accept(request, incoming, origin, first_seen, now_ms, bucket)
        return self._reject(request, incoming, origin, first_seen, now_ms, decision)

    def _check(
        self, request: GenerationRequest, buckets: Mapping[str, Bucket], now_ms: int
    ) -> tuple[Decision | None, Bucket | None]:
        """Steps 3-7: a terminal decision, or None and the tenant's new token-bucket state."""
        decision = self._refused(request, now_ms) or self._moderated(request) or self._shed(request)
        if decision is not None:
            return decision, None
        return self._limited(request, buckets, now_ms)

    def _refused(self, request: GenerationRequest, now_ms: int) -> Decision | None:
        """Steps 3-4: invalid, cancelled before admission, or past its deadline."""
        try:
            validate_request(
                request, self.settings.limits, self.settings.models.keys(), self.topics.reply_prefix, now_ms
            )
        except ValidationError as exc:
            return _decision("REJECTED", exc.code, str(exc), validated=False)
        if self.is_cancelled(request.request_id, request.tenant_id):
            return _decision("CANCELLED", "CANCELLED", "cancelled before it was admitted")
        if request.deadline_ms is not None and request.deadline_ms <= now_ms:
            return _decision("EXPIRED", "DEADLINE_EXCEEDED", "the deadline passed before it was admitted")
        return None

    def _moderated(self, request: GenerationRequest) -> Decision | None:
        """Step 5: the prompt, negative prompt and video end prompt against the content policy."""
        verdict = self.moderator.check(
            {
                "prompt": request.prompt,
                "negative_prompt": request.negative_prompt,
                "video.prompt_end": request.video.prompt_end if request.video else None,
            }
        )
        if verdict.allowed:
            return None
        moderation = ModerationVerdict(
            category=verdict.category or "",
            policy_version=verdict.policy_version,
            source=verdict.source,
            field=verdict.field or "prompt",
            reason=verdict.reason,
            model_version=verdict.model_version,
            score=verdict.score,
            scores=dict(verdict.scores),
        )
        message = f"{verdict.field} was blocked by the content policy ({verdict.category})"
        return _decision("REJECTED", "MODERATED", message, moderation=moderation)

    def _shed(self, request: GenerationRequest) -> Decision | None:
        """Step 6: the class's render backlog over its bound, or the tenant at its in-flight cap."""
        pool, priority = self.settings.models[request.model].pool, request.priority
        retry_after = self.overloaded(pool, priority)
        if retry_after is not None:
            message = f"the {priority} queue of pool {pool} is over its bound; retry later"
            return _decision("REJECTED", "OVERLOADED", message, retry_after_ms=retry_after)
        if self.busy(
            request.tenant_id, priority, task_count(request, self.settings.gatekeeper.frames_per_task)
        ):
            message = f"the tenant has as much {priority} work in flight as it may; retry when some finishes"
            return _decision("REJECTED", "TENANT_BUSY", message, retry_after_ms=BUSY_RETRY_AFTER_MS)
        return None

    def _limited(
        self, request: GenerationRequest, buckets: Mapping[str, Bucket], now_ms: int
    ) -> tuple[Decision | None, Bucket | None]:
        """Step 7, the tenant's token buckets: a rejection, or None and the buckets' new state."""
        tenant_id = request.tenant_id
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
        request: GenerationRequest,
        incoming: Mapping[str, bytes | None],
        origin: str,
        first_seen: int,
        now_ms: int,
        decision: Decision,
    ) -> Admission:
        """A terminal decision, sent to the sink as a Completion on the decisions topic."""
        request_id, tenant_id = request.request_id, request.tenant_id
        headers = continue_headers(incoming, request_id, tenant_id)
        if decision.validated and request.reply_topic:
            headers.append((REPLY_TOPIC, request.reply_topic.encode()))
        out = Outgoing(
            self.topics.decisions(request.priority),
            request_id.encode(),
            self.codec.write(self._completion(request, decision, now_ms)),
            headers,
        )
        return Admission(
            decision.status,
            [out],
            seen=Seen(origin=origin, first_seen=first_seen, decision=decision),
            reason=decision.reason_code,
            request_id=request_id,
            tenant_id=tenant_id,
        )

    def _completion(self, request: GenerationRequest, decision: Decision, now_ms: int) -> Completion:
        """The Completion that answers ``request`` with a terminal ``decision`` of the gatekeeper."""
        created_at = _echoed_created_at(request.created_at, now_ms)
        return Completion(
            request_id=request.request_id,
            tenant_id=request.tenant_id,
            status=decision.status,
            reason_code=decision.reason_code,
            message=decision.message,
            retry_after_ms=decision.retry_after_ms,
            moderation=decision.moderation,
            outputs=[],
            timings=Timings(total_ms=max(0, now_ms - created_at) if created_at else 0),
            labels=_echoed_labels(request.labels, self.settings.limits),
            created_at=created_at,
            finished_at=now_ms,
            webhook_url=request.webhook_url if decision.validated else None,
        )

    def _accept(
        self,
        request: GenerationRequest,
        incoming: Mapping[str, bytes | None],
        origin: str,
        first_seen: int,
        now_ms: int,
        bucket: Bucket | None,
    ) -> Admission:
        """Step 8: the render tasks, framed by the ACCEPTED and QUEUED status events."""
        request_id, tenant_id = request.request_id, request.tenant_id
        spec = self.settings.models[request.model]
        tasks = plan_tasks(request, spec.pool, self.settings.gatekeeper.frames_per_task, now_ms, now_ms)
        topic = self.topics.render(spec.pool, request.priority)
        key = request_id.encode()
        outputs = [self._status(request, "ACCEPTED", incoming, now_ms)]
        partitions = task_partitions(request_id, len(tasks), self.settings.kafka.render_partitions)
        outputs += [
            Outgoing(
                topic,
                key,
                self.codec.write(task),
                continue_headers(incoming, request_id, tenant_id),
                partition,
            )
            for task, partition in zip(tasks, partitions, strict=True)
        ]
        outputs.append(self._status(request, "QUEUED", incoming, now_ms, f"{len(tasks)} task(s) on {topic}"))
        return Admission(
            "ACCEPTED",
            outputs,
            seen=Seen(origin=origin, first_seen=first_seen),
            bucket=bucket,
            request_id=request_id,
            tenant_id=tenant_id,
            tasks=len(tasks),
            priority=request.priority,
        )

    def _status(
        self,
        request: GenerationRequest,
        state: RequestState,
        incoming: Mapping[str, bytes | None],
        now_ms: int,
        message: str | None = None,
    ) -> Outgoing:
        """A StatusEvent of the gatekeeper about ``request``, on the status topic."""
        event = StatusEvent(
            request_id=request.request_id,
            tenant_id=request.tenant_id,
            stage=Stage.GATEKEEPER.value,
            state=state,
            message=message,
            at=now_ms,
        )
        return Outgoing(
            self.topics.status,
            request.request_id.encode(),
            self.codec.write(event),
            continue_headers(incoming, request.request_id, request.tenant_id),
        )


def _echoed_labels(labels: Mapping[str, str], limits: RequestLimits) -> dict[str, str]:
    """The request's labels as its Completion echoes them: all of them when they keep the request limits,
    none otherwise. A rejected request's labels may never have been checked, and megabytes of them would
    make a decision larger than the gatekeeper's producer sends (about 1 MB: the worker crashes on it)."""
    if len(labels) > limits.max_labels or any(
        len(k) > limits.max_label_chars or len(v) > limits.max_label_chars for k, v in labels.items()
    ):
        return {}
    return dict(labels)


def _echoed_created_at(value: int, now_ms: int) -> int:
    """The request's created_at as its Completion echoes it, or 0 when it is not a plausible epoch-ms time.

    A rejected request's created_at may never have been checked (validation stops at the first broken
    rule), and an absurd one (negative, years ahead) would overflow ``total_ms`` (an Avro long) here or a
    Cassandra timestamp in the sink, crashing the stage instead of answering the request.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= now_ms + FUTURE_SKEW_MS:
        return 0
    return value


def _decision(
    status: CompletionStatus,
    reason: str,
    message: str,
    validated: bool = True,
    retry_after_ms: int | None = None,
    moderation: ModerationVerdict | None = None,
) -> Decision:
    """A terminal decision as stored in the ``seen`` entry, so a redelivery can replay it.

    The message is cut to MAX_MESSAGE_CHARS: some validation messages quote the offending value, which
    may be megabytes long (a scheduler name), and the decision must stay small enough to send."""
    message = message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 1] + "…"
    return Decision(
        status=status,
        reason_code=reason,
        message=message,
        validated=validated,
        retry_after_ms=retry_after_ms,
        moderation=moderation,
    )
