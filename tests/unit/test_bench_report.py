"""The benchmark report's side-by-side table of our figures and the Celery peer's."""

from __future__ import annotations

from bench.report import side_by_side


def pct(p50: float, p99: float, n: int = 10) -> dict[str, float | int]:
    return {"n": n, "p50": p50, "p95": p99, "p99": p99, "max": p99}


def test_no_table_without_the_peer() -> None:
    assert side_by_side({"B1": {"load_10pct": {"overhead_ms": pct(5, 9)}}}) == []


def test_each_figure_sits_beside_the_peer_s() -> None:
    results = {
        "B1": {"load_10pct": {"overhead_ms": pct(150, 770, 90)}},
        "B2": {"completed_per_s": 37.5},
        "B3": {"flood": {"high_requests": 82, "high_completed": 63, "high_e2e_ms": pct(4454, 8730, 63)}},
        "PEER": {
            "B1": {"load_10pct": {"overhead_ms": pct(4, 16, 88)}},
            "B2": {"completed_per_s": 580.0},
            "B3": {"flood": {"high_requests": 100, "high_completed": 100, "high_e2e_ms": pct(300, 442, 100)}},
        },
    }
    rows = {row.split(" | ")[0].lstrip("| "): row for row in side_by_side(results)}
    assert rows["B1 overhead p50 / p99 at 10% load (ms)"].endswith("| 150 / 770 (n 90) | 4 / 16 (n 88) |")
    assert rows["B3 HIGH e2e p50 / p99, LOW flood (ms)"].endswith(
        "| 4454 / 8730 (n 63) | 300 / 442 (n 100) |"
    )
    assert rows["B3 HIGH completed, flood"].endswith("| 63 of 82 | 100 of 100 |")
    assert rows["B2 completed requests/s, 0 ms service"].endswith("| 38 | 580 |")
    assert rows["B1 overhead p50 / p99 at 50% load (ms)"].endswith("| - | - |")  # not run: said, not invented
