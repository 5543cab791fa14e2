"""The liveness watchdog: a loop that stops beating ends its process with every thread's stack logged."""

from __future__ import annotations

import subprocess
import sys
import time

PROGRAM = """
import sys, time
from plumbing.watchdog import Watchdog
dog = Watchdog(2.0)
for _ in range(int(sys.argv[1])):  # a loop that beats, then one that hangs
    dog.beat()
    time.sleep(0.1)
if sys.argv[2] == "overstay":
    def a_call_past_its_limit():
        with dog.limit(1.0):
            time.sleep(60)
    with dog.limit(1.0):
        time.sleep(0.2)  # within the limit: the loop's timeout applies again after it
    time.sleep(1.5)
    a_call_past_its_limit()
if sys.argv[2] == "hang":
    def stuck_in_a_call():
        time.sleep(60)
    stuck_in_a_call()
dog.stop()
time.sleep(3.0)
print("alive")
"""


def run(beats: int, then: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    command = [sys.executable, "-c", PROGRAM, str(beats), then]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=30)
    return done, time.monotonic() - started


def test_a_loop_that_stops_beating_exits_with_its_stack_in_the_log():
    done, took = run(beats=40, then="hang")  # beats for 4 s (longer than the timeout), then hangs
    assert done.returncode == 1
    assert "Timeout (0:00:02)!" in done.stderr
    assert "stuck_in_a_call" in done.stderr  # the hung call is named in the dump
    assert 4.0 < took < 15.0  # beating kept it alive past the timeout; the hang ended it soon after


def test_stop_disarms_it():
    done, _ = run(beats=1, then="stop")  # then idles for longer than the timeout, disarmed
    assert done.returncode == 0 and "alive" in done.stdout, done.stderr


def test_a_call_that_overstays_its_limit_ends_the_process_sooner_than_the_loop_timeout():
    done, took = run(beats=1, then="overstay")
    assert done.returncode == 1
    assert "Timeout (0:00:01)!" in done.stderr and "a_call_past_its_limit" in done.stderr
    assert took < 10.0
