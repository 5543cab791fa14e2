"""Progress output: one line per state change in a file or a pipe, bars only on a terminal."""

from __future__ import annotations

import io
import os

from producers.progress import Bars, StateLines, progress_view

TOTALS = {"r1": ("image r1", 40), "r2": ("video r2", 160)}


def test_a_pipe_gets_one_line_per_state_change_however_many_updates() -> None:
    out = io.StringIO()
    view = progress_view(TOTALS, out)
    assert isinstance(view, StateLines)
    view.update("r1", "QUEUED")
    view.update("r2", "QUEUED")
    for done in range(0, 41, 2):  # many progress events in the same state
        view.update("r1", "RUNNING", done)
    view.update("r1", "SUCCEEDED", 40)
    for done in range(0, 100, 5):
        view.update("r2", "RUNNING", done)
    view.update("r2", "FAILED")
    view.close()
    assert out.getvalue().splitlines() == [
        "image r1: QUEUED (0/40 steps)",
        "video r2: QUEUED (0/160 steps)",
        "image r1: RUNNING (0/40 steps)",
        "image r1: SUCCEEDED (40/40 steps)",
        "video r2: RUNNING (0/160 steps)",
        "video r2: FAILED (95/160 steps)",
    ]


def test_a_real_file_is_not_a_terminal(tmp_path: os.PathLike[str]) -> None:
    with open(os.path.join(tmp_path, "log"), "w") as out:
        assert isinstance(progress_view(TOTALS, out), StateLines)


def test_a_terminal_gets_bars() -> None:
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w") as tty:
            view = progress_view(TOTALS, tty)
            assert isinstance(view, Bars)
            view.update("r1", "RUNNING", 20)
            assert view.bars["r1"].n == 20
            view.close()
    finally:
        os.close(master)
