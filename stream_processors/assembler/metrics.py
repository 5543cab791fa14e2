"""The assembler sink's metrics and readiness.

- ``aigc_assembler_frames_total``: frames announced to the sink (FramesRendered blobs);
- ``aigc_assembler_assembly_seconds{kind}``: storing a request's final objects (image copies, or a video
  decoded, encoded and uploaded), and ``aigc_assembler_encode_seconds`` for the encoding alone;
- ``aigc_completions_total{status, priority}`` and ``aigc_request_e2e_seconds{priority}`` (created_at to
  finished): counted when the transaction that publishes the Completion commits, so a batch that aborts
  and is handled again counts its completions once. A decision the gatekeeper made before rendering
  carries no class, so its ``priority`` label is empty;
- ``aigc_assembler_producers_replaced_total``: transactional producers given up on because
  send_offsets_to_transaction blocked (librdkafka #5511; see `Sink._send_offsets`);
- storage latency and errors come from `plumbing.metrics` (S3 calls, the store's Cassandra methods).

Readiness (`observe`): ``cassandra`` and ``model`` once the sink is built (it connects and loads the
output detector in its constructor), ``storage`` once the results bucket answers, ``kafka`` once the
transactional producer is initialised and the consumer subscribed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import Counter, Histogram

from plumbing.observability import LATENCY_BUCKETS, PRIORITY_LABELS, Readiness, enabled
from stream_processors.assembler.store import TerminalRow, ms

if TYPE_CHECKING:
    from stream_processors.assembler.sink import Sink

FRAMES = Counter("aigc_assembler_frames", "Frames announced to the sink by FramesRendered records")
PRODUCERS_REPLACED = Counter(
    "aigc_assembler_producers_replaced",
    "Transactional producers given up on because send_offsets_to_transaction blocked",
)
ASSEMBLY = Histogram(
    "aigc_assembler_assembly_seconds",
    "Storing a request's final objects (copies, or a video's decode, encode and upload)",
    ["kind"],
    buckets=LATENCY_BUCKETS,
)
ENCODE = Histogram(
    "aigc_assembler_encode_seconds", "Encoding one output (MP4, JPEG)", buckets=LATENCY_BUCKETS
)
COMPLETIONS = Counter(
    "aigc_completions", "Completions published (committed), by status and class", ["status", "priority"]
)
E2E = Histogram(
    "aigc_request_e2e_seconds",
    "From a request's created_at to its completion",
    ["priority"],
    buckets=LATENCY_BUCKETS,
)
READINESS = ("kafka", "cassandra", "model", "storage")  # what /readyz waits for
STATUSES = ("SUCCEEDED", "REJECTED", "FAILED", "CANCELLED", "EXPIRED")

T = TypeVar("T")


class SinkMetrics:
    """Completions wait here until their transaction commits (`committed`), or are dropped (`aborted`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: list[tuple[str, str, float | None]] = []

    def frames(self, count: int) -> None:
        """Count ``count`` frames announced by one FramesRendered record."""
        if enabled():
            FRAMES.inc(count)

    def published(self, row: TerminalRow) -> None:
        """The Completion of terminal ``row`` goes out in the open transaction."""
        if not enabled():
            return
        priority = row.priority if row.priority in PRIORITY_LABELS else ""
        status = row.status if row.status in STATUSES else "other"
        created, finished = ms(row.created_at), ms(row.finished_at)
        e2e = (finished - created) / 1000 if created and finished and finished >= created else None
        with self.lock:
            self.pending.append((status, priority, e2e))

    def committed(self) -> None:
        """The open transaction committed: count the Completions it published."""
        with self.lock:
            pending, self.pending = self.pending, []
        for status, priority, e2e in pending:
            COMPLETIONS.labels(status, priority).inc()
            if e2e is not None:
                E2E.labels(priority).observe(e2e)

    def producer_replaced(self) -> None:
        """A blocked transactional producer was replaced by a new one."""
        PRODUCERS_REPLACED.inc()

    def aborted(self) -> None:
        """The open transaction aborted: forget its Completions (the batch publishes them again)."""
        with self.lock:
            self.pending = []


def timed(histogram: Histogram, call: Callable[[], T], *labels: str) -> T:
    """``call()``, its duration observed in ``histogram`` (with ``labels``) while metrics are on."""
    if not enabled():
        return call()
    started = time.perf_counter()
    result = call()
    (histogram.labels(*labels) if labels else histogram).observe(time.perf_counter() - started)
    return result


def observe(readiness: Readiness, sink: Sink) -> None:
    """Mark what a built sink has (Cassandra, the detector) and probe the results bucket."""
    readiness.require(*READINESS)
    readiness.mark("cassandra")
    readiness.mark("model")
    bucket = sink.settings.s3.results_bucket
    readiness.check_until_met("storage", lambda: sink.blobs.client.head_bucket(Bucket=bucket))
