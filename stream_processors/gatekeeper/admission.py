"""What the gatekeeper does with one consumed request, as a pure function of the message and table state.

Consumes: a message from ``aigc.requests.<priority>`` (raw bytes and headers), the ``seen`` entry of its
request_id and the rate-limit state of its tenant. Produces an `Admission`: the messages to send and the
table entries to store; the faust agent only carries them out. In order:

1. decode: undecodable bytes are dead-lettered untouched (``aigc.dlq.gatekeeper``);
2. dedupe: a request_id seen within the window at another offset is dropped (no second result); the same
   offset seen again is a redelivery after a crash and is decided again, with the decision it had;
3. validate: bounds, ids, model; a broken rule is REJECTED with a reason code naming the field;
4. cancelled before admission -> CANCELLED; past its deadline -> EXPIRED;
5. moderate the prompt, negative prompt and video end prompt -> REJECTED / MODERATED;
6. per-tenant token buckets for requests and render cost -> REJECTED / RATE_LIMITED with a retry-after;
7. fan out into render tasks on ``aigc.render.<pool>.<priority>`` and announce ACCEPTED and QUEUED.

Terminal decisions (steps 3-6) are Completion records sent to ``aigc.decisions``, not straight to the
completions topic: the sink writes every terminal state once (a Cassandra lightweight transaction) and
publishes the Completion in a Kafka transaction, so a gatekeeper that crashes after sending a rejection
and before committing its offset cannot cause a second completion.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from plumbing.dead_letters import Failure, Original, dead_letter
from plumbing.errors import DecodeError, ValidationError
from plumbing.headers import REPLY_TOPIC, Headers, continue_headers
from plumbing.settings import Settings
from plumbing.topics import Stage, Topics
from schemas.codec import Codec
from schemas.validation import ID_PATTERN, render_cost, validate_request
from stream_processors.gatekeeper import ratelimit
from stream_processors.gatekeeper.fanout import plan_tasks
from stream_processors.gatekeeper.moderation import Moderator


@dataclass(frozen=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes
    headers: Headers


@dataclass
class Admission:
    verdict: str  # ACCEPTED, REJECTED, CANCELLED, EXPIRED, DUPLICATE, DEAD_LETTERED
    outputs: list[Output] = field(default_factory=list)
    seen: dict[str, Any] | None = None  # new entry for the request_id, when it is to be stored
    bucket: dict[str, float] | None = None  # new token-bucket state for the tenant
    reason: str | None = None
    request_id: str | None = None
    tenant_id: str | None = None


class Gate:
    def __init__(
        self,
        settings: Settings,
        codec: Codec,
        moderator: Moderator,
        is_cancelled: Callable[[str, str], bool] = lambda request_id, tenant_id: False,
    ) -> None:
        self.settings = settings
        self.codec = codec
        self.moderator = moderator
        self.is_cancelled = is_cancelled
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
        except DecodeError as exc:
            value, headers = dead_letter(
                self.codec, original, Failure.of(Stage.GATEKEEPER, exc, 1, now_ms, now_ms)
            )
            return Admission(
                "DEAD_LETTERED",
                [Output(self.topics.dlq(Stage.GATEKEEPER), original.key, value, headers)],
                reason=exc.code,
            )

        request_id, tenant_id = request["request_id"], request["tenant_id"]
        origin = f"{original.topic}:{original.partition}:{original.offset}"
        memo = seen.get(request_id) if ID_PATTERN.fullmatch(request_id) else None
        if memo and memo["o"] != origin and now_ms - memo["t"] < self.window_ms:
            return Admission("DUPLICATE", request_id=request_id, tenant_id=tenant_id)
        redelivered_accept = bool(memo and memo["o"] == origin and memo.get("d") == "A")
        incoming = dict(original.headers)

        def decide(status: str, reason: str, message: str, validated: bool = True, **extra: Any) -> Admission:
            completion = {
                "request_id": request_id,
                "tenant_id": tenant_id,
                "status": status,
                "reason_code": reason,
                "message": message,
                "outputs": [],
                "timings": {
                    "queued_ms": 0,
                    "render_ms": 0,
                    "assemble_ms": 0,
                    "total_ms": max(0, now_ms - request.get("created_at", now_ms)),
                },
                "labels": request.get("labels") or {},
                "created_at": request.get("created_at", 0),
                "finished_at": now_ms,
                **extra,
            }
            headers = continue_headers(incoming, request_id, tenant_id)
            if validated and request.get("reply_topic"):
                headers.append((REPLY_TOPIC, request["reply_topic"].encode()))
            out = Output(
                self.topics.decisions,
                request_id.encode(),
                self.codec.encode("Completion", completion),
                headers,
            )
            store = {"o": origin, "t": now_ms, "d": "R"} if ID_PATTERN.fullmatch(request_id) else None
            return Admission(
                status, [out], seen=store, reason=reason, request_id=request_id, tenant_id=tenant_id
            )

        try:
            validate_request(
                request, self.settings.limits, self.settings.models.keys(), self.topics.reply_prefix, now_ms
            )
        except ValidationError as exc:
            return decide("REJECTED", exc.code, str(exc), validated=False)
        if self.is_cancelled(request_id, tenant_id):
            return decide("CANCELLED", "CANCELLED", "cancelled before it was admitted")
        if request.get("deadline_ms") is not None and request["deadline_ms"] <= now_ms:
            return decide(
                "EXPIRED", "DEADLINE_EXCEEDED", "the deadline passed before the request was admitted"
            )
        video = request.get("video") or {}
        verdict = self.moderator.check(
            {
                "prompt": request["prompt"],
                "negative_prompt": request.get("negative_prompt"),
                "video.prompt_end": video.get("prompt_end"),
            }
        )
        if not verdict.allowed:
            return decide(
                "REJECTED",
                "MODERATED",
                f"{verdict.field} was blocked by the content policy ({verdict.category})",
                moderation={
                    "category": verdict.category or "",
                    "policy_version": verdict.policy_version,
                    "source": verdict.source,
                    "field": verdict.field or "prompt",
                },
            )

        bucket = None
        if not redelivered_accept:
            taken = ratelimit.take(
                buckets.get(tenant_id),
                self.settings.gatekeeper.tier_of(tenant_id),
                render_cost(request),
                now_ms,
            )
            if not taken.allowed:
                if taken.reason == "COST_EXCEEDS_TIER":
                    return decide(
                        "REJECTED",
                        "COST_EXCEEDS_TIER",
                        "the request costs more than the tenant's tier allows at once",
                    )
                return decide(
                    "REJECTED",
                    "RATE_LIMITED",
                    "the tenant is over its rate limit; retry later",
                    retry_after_ms=taken.retry_after_ms,
                )
            bucket = taken.state
        return self._accept(request, incoming, origin, now_ms, bucket)

    def _accept(
        self,
        request: dict[str, Any],
        incoming: Mapping[str, bytes | None],
        origin: str,
        now_ms: int,
        bucket: dict[str, float] | None,
    ) -> Admission:
        request_id, tenant_id = request["request_id"], request["tenant_id"]
        spec = self.settings.models[request["model"]]
        tasks = plan_tasks(request, spec.pool, self.settings.gatekeeper.frames_per_task, now_ms, now_ms)
        topic = self.topics.render(spec.pool, request.get("priority") or "NORMAL")
        key = request_id.encode()
        outputs = [self._status(request, "ACCEPTED", incoming, now_ms)]
        outputs += [
            Output(
                topic,
                key,
                self.codec.encode("RenderTask", task),
                continue_headers(incoming, request_id, tenant_id),
            )
            for task in tasks
        ]
        outputs.append(self._status(request, "QUEUED", incoming, now_ms, f"{len(tasks)} task(s) on {topic}"))
        return Admission(
            "ACCEPTED",
            outputs,
            seen={"o": origin, "t": now_ms, "d": "A"},
            bucket=bucket,
            request_id=request_id,
            tenant_id=tenant_id,
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
