"""A consumed RenderTask with its Kafka coordinates, and what micro-batching may group together."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gpu_consumers.backends.base import FrameSpec
from plumbing.dead_letters import Original

PRIORITY_RANK = {"HIGH": 0, "NORMAL": 1, "LOW": 2}


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
    record: dict[str, Any]
    topic: str
    partition: int
    offset: int
    headers: dict[str, bytes]
    received_at: float  # monotonic seconds, for aging and waits
    original: Original | None = None  # the consumed message, for retries and dead letters
    key: BatchKey = field(init=False)

    def __post_init__(self) -> None:
        r = self.record
        self.key = BatchKey(
            r["model"], r["width"], r["height"], r["steps"], float(r["guidance_scale"]), r.get("scheduler")
        )

    @property
    def coords(self) -> tuple[str, int, int]:
        """Where it was consumed: (topic, partition, offset)."""
        return self.topic, self.partition, self.offset

    @property
    def task_id(self) -> str:
        return str(self.record["task_id"])

    @property
    def request_id(self) -> str:
        return str(self.record["request_id"])

    @property
    def tenant_id(self) -> str:
        return str(self.record["tenant_id"])

    @property
    def priority(self) -> str:
        return str(self.record["priority"])

    @property
    def rank(self) -> int:
        return PRIORITY_RANK[self.priority]

    @property
    def frame_count(self) -> int:
        return int(self.record["frame_end"]) - int(self.record["frame_start"])

    def frames(self) -> list[FrameSpec]:
        r = self.record
        recipe = r["recipe"]
        return [
            FrameSpec(
                recipe["seed_start"],
                recipe["seed_end"],
                min(1.0, max(0.0, t)),
                r["prompt"],
                r.get("prompt_end"),
                r.get("negative_prompt"),
            )
            for t in recipe["positions"]
        ]
