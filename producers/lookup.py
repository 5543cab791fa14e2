"""`aigc get`: a request's state and outputs, read from Cassandra (with fresh presigned URLs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plumbing.blobs import BlobStore
from plumbing.metadata import connect, register_types
from plumbing.settings import Settings


@dataclass(frozen=True)
class RequestState:
    """What Cassandra knows of a request: its terminal row and outputs, or how many frames it has so far."""

    request_id: str
    status: str  # a terminal status, or IN_PROGRESS / UNKNOWN
    row: Any | None
    frames_stored: int
    outputs: list[dict[str, Any]]


def lookup(settings: Settings, request_id: str) -> RequestState:
    """The request's state from its terminal row and frame rows, its outputs with fresh presigned URLs."""
    ks = settings.cassandra.keyspace
    cluster, session = connect(settings.cassandra)
    try:
        register_types(cluster, ks)
        row = session.execute(f"SELECT * FROM {ks}.requests WHERE request_id = %s", (request_id,)).one()
        frames = session.execute(
            f"SELECT count(*) FROM {ks}.frames WHERE request_id = %s", (request_id,)
        ).one()[0]
    finally:
        cluster.shutdown()
    if row is None:
        return RequestState(request_id, "IN_PROGRESS" if frames else "UNKNOWN", None, frames, [])
    blobs = BlobStore(settings.s3)
    outputs = []
    for out in row.outputs or []:
        url, _ = blobs.presign(out.bucket, out.key)
        outputs.append({**out._asdict(), "presigned_url": url})
    return RequestState(request_id, row.status, row, frames, outputs)


def describe(state: RequestState) -> str:
    """``state`` as `aigc get` prints it: the outcome, the request's facts, timings and each output."""
    if state.row is None:
        if state.status == "IN_PROGRESS":
            return f"{state.request_id}: in progress ({state.frames_stored} frame(s) rendered so far)"
        return f"{state.request_id}: unknown (not finished, or never accepted)"
    r = state.row
    lines = [
        f"{r.request_id}  {r.status}" + (f"  {r.reason_code}: {r.message}" if r.reason_code else ""),
        f"  tenant {r.tenant_id}, {(r.kind or '').lower()} {r.width}x{r.height}, model {r.model}, "
        f"{r.steps} steps, seed {r.seed}"
        if r.kind
        else f"  tenant {r.tenant_id}",
        f"  created {r.created_at:%Y-%m-%d %H:%M:%S} UTC, finished {r.finished_at:%H:%M:%S}, "
        f"total {r.total_ms} ms "
        f"(queued {r.queued_ms}, render {r.render_ms}, assemble {r.assemble_ms})",
    ]
    if r.prompt:
        lines.insert(2, f"  prompt: {r.prompt}")
    for out in state.outputs:
        lines.append(f"  {out['kind'].lower()}: s3://{out['bucket']}/{out['key']} ({out['bytes']} bytes)")
        lines.append(f"    {out['presigned_url']}")
    return "\n".join(lines)
