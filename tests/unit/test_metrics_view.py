"""The arithmetic `aigc top` and the demo summary share: counter increases and histogram quantiles."""

from __future__ import annotations

import math

import pytest

from producers.metrics_view import Snapshot, histogram_quantile, increase_by, quantile_by


def snap(at: float, samples: dict[str, list[tuple[dict[str, str], float]]]) -> Snapshot:
    s = Snapshot(at)
    for name, series in samples.items():
        for labels, value in series:
            s.add(name, labels, value)
    return s


def test_increase_counts_new_series_from_zero_and_survives_a_reset():
    old = snap(0, {"c_total": [({"i": "a", "p": "HIGH"}, 10), ({"i": "b", "p": "HIGH"}, 50)]})
    new = snap(10, {"c_total": [({"i": "a", "p": "HIGH"}, 14), ({"i": "b", "p": "HIGH"}, 3),
                                ({"i": "c", "p": "LOW"}, 2)]})  # fmt: skip
    assert increase_by(old, new, "c_total", ("p",)) == {("HIGH",): 4 + 3, ("LOW",): 2}
    assert increase_by(None, new, "c_total", ()) == {(): 19}


def test_histogram_quantile_interpolates_like_prometheus():
    assert histogram_quantile(0.5, {0.1: 0, 0.5: 10, math.inf: 10}) == pytest.approx(0.3)
    assert histogram_quantile(0.99, {1.0: 5, math.inf: 10}) == 1.0  # in +Inf: the highest finite bound
    assert math.isnan(histogram_quantile(0.5, {1.0: 0, math.inf: 0}))
    old = snap(0, {"h_bucket": [({"le": "0.05"}, 5), ({"le": "+Inf"}, 5)]})
    new = snap(5, {"h_bucket": [({"le": "0.05"}, 5), ({"le": "+Inf"}, 15)]})
    assert quantile_by(old, new, "h", 0.5, ()) == {(): 0.05}
