"""A consumed RenderTask with its Kafka coordinates, and what micro-batching may group together."""

from __future__ import annotations

from dataclasses import dataclass, field

from gpu_consumers.backends.base import FrameSpec
from plumbing.dead_letters import Original
from schemas.records import Priority, RenderTask

PRIORITY_RANK: dict[str, int] = {"HIGH": 0, "NORMAL": 1, "LOW": 2}


@dataclass(frozen=True)
class BatchKey:
    """Tasks with equal keys can share one diffusers call."""

    model: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str | None


@dataclass
class Task:
    """A decoded RenderTask as the renderer holds it: the record, where it was consumed, when it arrived."""

    record: RenderTask
    topic: str
    partition: int
    offset: int
    headers: dict[str, bytes]
    received_at: float  # monotonic seconds, for aging and waits
    original: Original | None = None  # the consumed message, for retries and dead letters
    key: BatchKey = field(init=False)

    def __post_init__(self) -> None:
        r = self.record
        self.key = BatchKey(r.model, r.width, r.height, r.steps, float(r.guidance_scale), r.scheduler)

    @property
    def coords(self) -> tuple[str, int, int]:
        """Where it was consumed: (topic, partition, offset)."""
        return self.topic, self.partition, self.offset

    @property
    def task_id(self) -> str:
        """The record's task id (``<request_id>.<frame_start>``)."""
        return self.record.task_id

    @property
    def request_id(self) -> str:
        """The request the task belongs to."""
        return self.record.request_id

    @property
    def tenant_id(self) -> str:
        """The owner of the request."""
        return self.record.tenant_id

    @property
    def priority(self) -> Priority:
        """The task's scheduling class: HIGH, NORMAL or LOW."""
        return self.record.priority

    @property
    def rank(self) -> int:
        """The class's urgency: 0 for HIGH, 2 for LOW."""
        return PRIORITY_RANK[self.priority]

    @property
    def frame_count(self) -> int:
        """Frames in this task's range (not in the whole request)."""
        return self.record.frame_end - self.record.frame_start

    def frames(self) -> list[FrameSpec]:
        """One `FrameSpec` per frame of the range, its position clamped to [0, 1]."""
        r = self.record
        recipe = r.recipe
        return [
            FrameSpec(
                recipe.seed_start,
                recipe.seed_end,
                min(1.0, max(0.0, t)),
                r.prompt,
                r.prompt_end,
                r.negative_prompt,
            )
            for t in recipe.positions
        ]
