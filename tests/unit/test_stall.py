"""When the gatekeeper's stall guard calls a request partition stuck."""

from __future__ import annotations

from stream_processors.gatekeeper.stall import Progress

TP = ("aigc.requests.high", 1)


def test_a_partition_that_trails_its_end_without_moving_is_stuck_after_the_timeout():
    progress = Progress(timeout_s=60)
    assert progress.stuck({TP: (7, 8)}, now=0) == []
    assert progress.stuck({TP: (7, 8)}, now=59) == []
    assert progress.stuck({TP: (7, 8)}, now=61) == ["aigc.requests.high[1] at 7 of 8"]


def test_progress_or_an_empty_backlog_restarts_the_clock():
    progress = Progress(timeout_s=60)
    progress.stuck({TP: (7, 20)}, now=0)
    assert progress.stuck({TP: (9, 20)}, now=50) == []  # moved: a slow backlog, not a stuck one
    assert progress.stuck({TP: (9, 20)}, now=100) == []
    assert progress.stuck({TP: (20, 20)}, now=200) == []  # caught up: idle is fine however long
    assert progress.stuck({TP: (20, 20)}, now=400) == []
    assert progress.stuck({TP: (20, 21)}, now=401) == []
    assert progress.stuck({TP: (20, 21)}, now=462) == ["aigc.requests.high[1] at 20 of 21"]
