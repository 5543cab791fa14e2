"""Every stage's view of the compacted cancellations topic.

A background thread reads all partitions of ``aigc.cancellations`` from the beginning (no consumer
group, so every process sees every cancellation) and keeps request_id -> tenant_id in memory; a
tombstone forgets one. `is_cancelled` answers from memory, so stages can ask per message, and the
renderer between denoising steps. A cancellation naming the wrong tenant is ignored.
"""

from __future__ import annotations

import logging

from plumbing.compacted import CompactedTopicFollower
from plumbing.errors import DecodeError
from plumbing.settings import Settings
from plumbing.topics import Topics
from schemas.codec import Codec
from schemas.records import CancelRequest

log = logging.getLogger(__name__)


class CancellationWatcher(CompactedTopicFollower):
    """request_id -> (tenant_id, reason) of every cancellation, from the cancellations topic."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, Topics(settings).cancellations, "cancellations")
        self._cancelled: dict[str, tuple[str, str | None]] = {}

    def is_cancelled(self, request_id: str, tenant_id: str | None = None) -> bool:
        """Whether ``request_id`` is cancelled; with ``tenant_id``, only by that tenant."""
        with self._lock:
            entry = self._cancelled.get(request_id)
        return entry is not None and (tenant_id is None or entry[0] == tenant_id)

    def reason(self, request_id: str) -> str | None:
        """The reason ``request_id``'s cancellation gives, if it is cancelled and gives one."""
        with self._lock:
            entry = self._cancelled.get(request_id)
        return entry[1] if entry else None

    def _apply(self, key: bytes | None, value: bytes | None, codec: Codec) -> None:
        if key is None:
            return
        request_id = key.decode("utf-8", "replace")
        if value is None:
            with self._lock:
                self._cancelled.pop(request_id, None)
            return
        try:
            cancel = codec.read(value, CancelRequest)
        except DecodeError:
            log.warning("ignoring an undecodable cancellation for %s", request_id)
            return
        with self._lock:
            self._cancelled[cancel.request_id] = (cancel.tenant_id, cancel.reason)
