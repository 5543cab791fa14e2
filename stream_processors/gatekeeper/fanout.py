"""Turn an accepted GenerationRequest into RenderTasks with a deterministic latent recipe.

An image request becomes one task per image (image j uses seed + j). A video becomes tasks of
``frames_per_task`` consecutive frames; frame i of n sits at position t = i / (n - 1) on the walk from
the start seed's noise to the end seed's (spherical interpolation) and from ``prompt`` to ``prompt_end``
(interpolated text embeddings), so frames rendered by different workers form one smooth clip.
Everything here is a pure function of the request, so a redelivered request yields identical tasks.
"""

from __future__ import annotations

import dataclasses
import hashlib

from schemas.records import GenerationRequest, LatentRecipe, OutputFormat, RenderTask

INT64_MAX = 2**63 - 1


def derive_seed(request_id: str) -> int:
    """The seed of a request that named none: stable across redeliveries and processes."""
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "little") & INT64_MAX


def _wrap(seed: int) -> int:
    """Keep seed arithmetic inside Avro's signed 64-bit long."""
    return (seed + 2**63) % 2**64 - 2**63


def output_format(request: GenerationRequest) -> OutputFormat:
    """The request's output format, or its kind's default (MP4 for a video, PNG for images)."""
    return request.output_format or ("MP4" if request.kind == "VIDEO" else "PNG")


def task_count(request: GenerationRequest, frames_per_task: int) -> int:
    """How many tasks `plan_tasks` makes of ``request``, without making them."""
    video = request.video
    if video:
        return -(-video.num_frames // frames_per_task)
    return request.num_images


def plan_tasks(
    request: GenerationRequest, pool: str, frames_per_task: int, accepted_at: int, enqueued_at: int
) -> list[RenderTask]:
    """The RenderTask records of ``request``, in frame order."""
    seed = request.seed if request.seed is not None else derive_seed(request.request_id)
    video = request.video
    common = RenderTask(
        task_id="",
        request_id=request.request_id,
        tenant_id=request.tenant_id,
        priority=request.priority,
        kind=request.kind,
        pool=pool,
        model=request.model,
        prompt=request.prompt,
        prompt_end=video.prompt_end if video else None,
        negative_prompt=request.negative_prompt,
        width=request.width,
        height=request.height,
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        scheduler=request.scheduler,
        seed=seed,
        frame_start=0,
        frame_end=0,
        frame_count=0,
        recipe=LatentRecipe(seed_start=seed, seed_end=seed, positions=[]),
        fps=video.fps if video else None,
        output_format=output_format(request),
        reply_topic=request.reply_topic,
        webhook_url=request.webhook_url,
        labels=dict(request.labels),
        created_at=request.created_at,
        accepted_at=accepted_at,
        enqueued_at=enqueued_at,
        deadline_ms=request.deadline_ms,
        attempt=0,
    )
    tasks = []
    if video:
        frames = video.num_frames
        seed_end = video.seed_end if video.seed_end is not None else _wrap(seed + 1)
        for start in range(0, frames, frames_per_task):
            end = min(frames, start + frames_per_task)
            positions = [i / (frames - 1) for i in range(start, end)]
            tasks.append(
                dataclasses.replace(
                    common,
                    task_id=f"{request.request_id}.{start}",
                    frame_start=start,
                    frame_end=end,
                    frame_count=frames,
                    recipe=LatentRecipe(seed_start=seed, seed_end=seed_end, positions=positions),
                    labels=dict(common.labels),
                )
            )
    else:
        images = request.num_images
        for j in range(images):
            image_seed = _wrap(seed + j)
            tasks.append(
                dataclasses.replace(
                    common,
                    task_id=f"{request.request_id}.{j}",
                    frame_start=j,
                    frame_end=j + 1,
                    frame_count=images,
                    recipe=LatentRecipe(seed_start=image_seed, seed_end=image_seed, positions=[0.0]),
                    labels=dict(common.labels),
                )
            )
    return tasks
