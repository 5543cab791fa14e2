"""Per-tenant in-flight caps: how much of a class's render queue one tenant may occupy.

Render topics are FIFO partitions, so a tenant that floods a class would put its whole burst ahead of
every later tenant's work, beyond the reach of any renderer lookahead. The gatekeeper therefore counts,
per tenant and class, the render tasks it has queued whose request has no Completion yet, and turns
away a request that would take the tenant past its class's cap (REJECTED / TENANT_BUSY, with a
retry-after). A newcomer then waits behind at most one cap of each other tenant's work; the renderers'
per-tenant round-robin does the rest. Size a cap to keep the pool busy (about renderers x batch x 2),
so a tenant alone still uses every renderer.

Requests are keyed by tenant, so one gatekeeper sees all of a tenant's requests: counts are per
process, in memory. A thread follows ``aigc.completions`` from its end and releases finished requests.
After a restart the counts start from zero, which only errs towards admitting.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter

from confluent_kafka import OFFSET_END, KafkaException, TopicPartition

from plumbing.errors import DecodeError
from plumbing.kafka_clients import make_consumer
from plumbing.settings import Settings
from plumbing.topics import Topics
from schemas.codec import default_codec
from schemas.records import Completion

log = logging.getLogger(__name__)
POLL_S = 0.2
RETRY_S = 2.0
BUSY_RETRY_AFTER_MS = 2_000


class InflightCaps:
    """Render tasks queued and not finished, per tenant and class, against each class's cap (thread-safe)."""

    def __init__(self, caps: dict[str, int]) -> None:
        self.caps = caps
        self.lock = threading.Lock()
        self.requests: dict[str, tuple[str, str, int]] = {}  # request_id -> (tenant, class, tasks)
        self.counts: Counter[tuple[str, str]] = Counter()

    def would_exceed(self, tenant_id: str, priority: str, tasks: int) -> bool:
        """Whether ``tasks`` more would take the tenant past its cap in ``priority`` (never for a class
        without a cap, nor for a tenant with nothing in flight there)."""
        cap = self.caps.get(priority)
        if cap is None:
            return False
        with self.lock:
            current = self.counts[(tenant_id, priority)]
        # A request bigger than the cap on its own is admitted when the tenant has nothing in flight.
        return current > 0 and current + tasks > cap

    def admitted(self, request_id: str, tenant_id: str, priority: str, tasks: int) -> None:
        """Count an accepted request's tasks (once per request_id, however often it is redelivered)."""
        with self.lock:
            if request_id in self.requests:  # a redelivered request is counted once
                return
            self.requests[request_id] = (tenant_id, priority, tasks)
            self.counts[(tenant_id, priority)] += tasks

    def finished(self, request_id: str) -> None:
        """Release a request's tasks; a request not counted here is ignored."""
        with self.lock:
            entry = self.requests.pop(request_id, None)
            if entry is not None:
                tenant_id, priority, tasks = entry
                self.counts[(tenant_id, priority)] -= tasks
                if self.counts[(tenant_id, priority)] <= 0:
                    del self.counts[(tenant_id, priority)]

    def in_flight(self, tenant_id: str, priority: str) -> int:
        """The tenant's tasks counted in ``priority`` now."""
        with self.lock:
            return self.counts[(tenant_id, priority)]


class CompletionFollower:
    """Releases finished requests from `InflightCaps` as their Completions appear."""

    def __init__(self, settings: Settings, caps: InflightCaps) -> None:
        self.settings = settings
        self.caps = caps
        self.topic = Topics(settings).completions
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inflight", daemon=True)

    def start(self) -> CompletionFollower:
        """Start following (only when some class has a cap); returns self."""
        if self.caps.caps:
            self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the thread to stop; it does within a poll."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow()
            except KafkaException as exc:  # a broker outage: follow again from the end
                log.warning("in-flight caps: %s; following again in %.0f s", exc, RETRY_S)
                self._stop.wait(RETRY_S)

    def _follow(self) -> None:
        consumer = make_consumer(self.settings, f"inflight-{uuid.uuid4().hex}", "inflight")
        codec = default_codec()
        try:
            partitions = consumer.list_topics(self.topic, timeout=10).topics[self.topic].partitions
            consumer.assign([TopicPartition(self.topic, p, OFFSET_END) for p in partitions])
            while not self._stop.is_set():
                msg = consumer.poll(POLL_S)
                if msg is None or msg.error():
                    continue
                try:
                    self.caps.finished(codec.read(msg.value(), Completion).request_id)
                except DecodeError:
                    continue
        finally:
            consumer.close()
