"""A bound on how long a stopping process may take: past it, the process exits anyway.

A stage asked to stop (SIGTERM) finishes its work in hand, commits and flushes. When the broker is
already gone (the services were stopped before the stages), that stop can wait without end: in the
gatekeeper, faust's consumer thread (aiokafka) fails while closing its fetcher against the missing
broker (NodeNotReadyError, then CancelledError), and the worker's stop goes on waiting for that thread,
so the process sat until the supervisor killed it 30 s later. Exiting without a clean goodbye is safe:
every stage is at-least-once, so what was not committed is redelivered and deduplicated.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)
EXIT_CODE = 75  # EX_TEMPFAIL: stopped, but without a clean goodbye to the broker


def exit_after(grace_s: float, what: str) -> threading.Timer:
    """Start a daemon timer that ends the process (``os._exit``) if it is still running in ``grace_s``."""

    def _exit() -> None:
        log.warning("%s did not finish stopping in %.0f s; exiting (uncommitted work is redelivered)",
                    what, grace_s)  # fmt: skip
        logging.shutdown()
        os._exit(EXIT_CODE)

    timer = threading.Timer(grace_s, _exit)
    timer.daemon = True
    timer.start()
    return timer


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM: a stage's loop runs until it is set, then finishes its work in
    hand."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop
