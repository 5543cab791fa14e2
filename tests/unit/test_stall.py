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


def test_a_partition_held_by_another_worker_is_left_to_it_for_a_second_timeout():
    progress = Progress(timeout_s=60)
    other = ("aigc.requests.high", 2)
    progress.stuck({TP: (7, 8), other: (3, 4)}, now=0, held={TP})
    # This worker holds TP: it restarts for it at the timeout; `other` is another worker's to restart.
    assert progress.stuck({TP: (7, 8), other: (3, 4)}, now=61, held={TP}) == [
        "aigc.requests.high[1] at 7 of 8"
    ]
    assert progress.stuck({other: (3, 4)}, now=119, held={TP}) == []
    # Nobody read it in twice the timeout: this worker restarts too (the holder's view may be wrong).
    assert progress.stuck({other: (3, 4)}, now=121, held={TP}) == ["aigc.requests.high[2] at 3 of 4"]
    # An assignment that is not known counts as held.
    assert progress.stuck({other: (3, 4)}, now=121) == ["aigc.requests.high[2] at 3 of 4"]
