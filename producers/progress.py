"""How a request's progress is shown: live bars on a terminal, one line per state change elsewhere.

A terminal redraws a progress bar in place; a file or a pipe cannot, so every redraw would become a
new line (a log of two requests held ~100 lines of bars). `progress_view` picks bars when the stream is
a terminal and `StateLines` otherwise, which prints a line only when a request's state changes.
"""

from __future__ import annotations

import sys
from typing import Protocol, TextIO

from tqdm import tqdm


class ProgressView(Protocol):
    """Shows each request's state and steps done out of its total."""

    def update(self, request_id: str, state: str, done: int | None = None) -> None:
        """Record that ``request_id`` is in ``state`` with ``done`` steps finished (None: unchanged)."""

    def close(self) -> None:
        """Finish the display."""


class StateLines:
    """One line per state change of a request: for logs, pipes and CI output."""

    def __init__(self, totals: dict[str, tuple[str, int]], out: TextIO) -> None:
        """``totals``: request_id -> (label, total steps)."""
        self.totals = totals
        self.out = out
        self.states: dict[str, str] = {}
        self.done: dict[str, int] = dict.fromkeys(totals, 0)

    def update(self, request_id: str, state: str, done: int | None = None) -> None:
        """Print a line when ``request_id``'s state changed (progress alone prints nothing)."""
        if done is not None:
            self.done[request_id] = done
        if self.states.get(request_id) == state:
            return
        self.states[request_id] = state
        label, total = self.totals[request_id]
        print(f"{label}: {state} ({self.done[request_id]}/{total} steps)", file=self.out, flush=True)

    def close(self) -> None:
        """Nothing to finish: every line is already out."""


class Bars:
    """A tqdm bar per request, redrawn in place on a terminal."""

    def __init__(self, totals: dict[str, tuple[str, int]], out: TextIO) -> None:
        self.bars = {
            rid: tqdm(
                total=total,
                desc=label,
                position=i,
                unit="step",
                leave=True,
                dynamic_ncols=True,
                file=out,
                mininterval=0.1,
            )
            for i, (rid, (label, total)) in enumerate(totals.items())
        }

    def update(self, request_id: str, state: str, done: int | None = None) -> None:
        """Redraw ``request_id``'s bar with its state and steps done."""
        bar = self.bars[request_id]
        if done is not None:
            bar.n = min(bar.total, done)
        bar.set_postfix_str(state.lower(), refresh=False)
        bar.refresh()

    def close(self) -> None:
        """Close every bar, leaving its last state on the terminal."""
        for bar in self.bars.values():
            bar.close()


def progress_view(totals: dict[str, tuple[str, int]], out: TextIO | None = None) -> ProgressView:
    """Bars when ``out`` (default stdout) is a terminal, one line per state change otherwise."""
    out = out or sys.stdout
    return Bars(totals, out) if out.isatty() else StateLines(totals, out)
