"""A liveness watchdog for a stage's main loop: no beat for ``timeout_s`` and the process exits.

A loop that stops making progress (a client library call that never returns, a lock never released)
would hold its work forever while looking alive to the supervisor. The watchdog turns such a hang into
what every stage already survives, a crash: the standard library's `faulthandler` writes every thread's
stack to stderr (the stage's log, so the hang can be diagnosed) and exits with status 1; the supervisor
(or the container's restart policy) starts the stage again and the uncommitted work is redelivered.

Re-arming `faulthandler` restarts its timer thread, so `beat` re-arms at most once a second: the process
exits between ``timeout_s - 1`` and ``timeout_s`` seconds after its last beat. `limit` holds one call
to a tighter bound, for a call that has its own timeout and is known to overstay it at times.
"""

from __future__ import annotations

import faulthandler
import time
from collections.abc import Iterator
from contextlib import contextmanager

REARM_EVERY_S = 1.0


class Watchdog:
    """Exits the process, every thread's stack in its log, when `beat` was not called for ``timeout_s``."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._armed_at: float | None = None

    def beat(self) -> None:
        """The loop made progress: restart the countdown (re-arming at most once a second)."""
        now = time.monotonic()
        if self._armed_at is None or now - self._armed_at >= REARM_EVERY_S:
            faulthandler.dump_traceback_later(self.timeout_s, exit=True)
            self._armed_at = now

    @contextmanager
    def limit(self, seconds: float) -> Iterator[None]:
        """The process exits if the block takes longer than ``seconds``; the loop's timeout applies after."""
        faulthandler.dump_traceback_later(seconds, exit=True)
        try:
            yield
        finally:
            self._armed_at = None
            self.beat()

    def stop(self) -> None:
        """Disarm: the process no longer exits for lack of beats."""
        faulthandler.cancel_dump_traceback_later()
        self._armed_at = None
