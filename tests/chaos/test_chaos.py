"""A small chaos run in CI: every stage killed once and the broker restarted once under load.

`aigc chaos` (make chaos) is the full version: 200 requests, three kills per stage process, two broker
restarts. This one keeps CI short; it restarts the session's broker, so this tier runs last.
"""

from __future__ import annotations

from plumbing.settings import Settings
from producers.chaos import ChaosPlan, run_chaos

SEED = 20261123  # fixed in CI; a failure prints it for `aigc chaos --seed`


def test_nothing_is_lost_or_duplicated_when_stages_and_the_broker_die(infra: Settings):
    plan = ChaosPlan(
        requests=40, duration_s=30.0, kills_per_stage=1, broker_restarts=1, renderers=1, seed=SEED
    )
    report = run_chaos(infra, plan, echo=print, attached=True)
    print(report.summary())
    assert report.delivery is not None, "no delivery report"
    assert len(report.submitted) == plan.requests
    assert sum(report.kills.values()) == len(report.kills) and report.broker_restarts == 1
    assert report.delivery.lost == [], report.summary()
    assert report.delivery.duplicates == {}, report.summary()
    assert report.delivery.orphan_rows == [] and report.delivery.orphan_objects == [], report.summary()
    assert report.drain_s is not None
