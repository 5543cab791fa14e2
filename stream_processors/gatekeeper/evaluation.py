"""Scoring prompt moderation on a labelled JSONL file, through the gatekeeper's own Moderator.

Consumes lines ``{"id", "lang", "label": "safe"|"unsafe", "category", "evasion", "prompt"}`` and a
`Moderator`; produces a report: precision, recall and F1 overall and per category, language and evasion
kind, the false-positive rate on safe prompts (overall and per group), latency percentiles of the whole
check per prompt, and one verdict per line. A line that is not such an object is an `EvalFileError`
naming the line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from stream_processors.gatekeeper.moderation import Moderator, Verdict

LABELS = ("safe", "unsafe")
_REQUIRED = ("id", "lang", "label", "category", "evasion", "prompt")


class EvalFileError(ValueError):
    """A line of the evaluation file is not a labelled prompt."""


def read_rows(path: Path) -> list[dict[str, str]]:
    """The labelled prompts of a JSONL file; blank lines are skipped."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise EvalFileError(f"{path}:{number}: not JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise EvalFileError(f"{path}:{number}: expected a JSON object")
        missing = [key for key in ("label", "prompt") if not isinstance(row.get(key), str)]
        if missing:
            raise EvalFileError(f"{path}:{number}: {missing[0]!r} must be a string")
        if row["label"] not in LABELS:
            raise EvalFileError(f"{path}:{number}: label must be safe or unsafe, got {row['label']!r}")
        rows.append({key: str(row.get(key) or "") for key in _REQUIRED} | {"id": str(row.get("id", number))})
    return rows


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def scores(rows: Sequence[dict[str, str]], blocked: Sequence[bool]) -> dict[str, Any]:
    """Confusion counts and precision, recall, F1 and false-positive rate of `blocked` against labels."""
    tp = sum(1 for row, b in zip(rows, blocked, strict=True) if b and row["label"] == "unsafe")
    fp = sum(1 for row, b in zip(rows, blocked, strict=True) if b and row["label"] == "safe")
    unsafe = sum(1 for row in rows if row["label"] == "unsafe")
    safe = len(rows) - unsafe
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / unsafe if unsafe else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else None
    return {
        "n": len(rows),
        "unsafe": unsafe,
        "safe": safe,
        "tp": tp,
        "fp": fp,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "fpr": fp / safe if safe else None,
    }


def breakdown(rows: Sequence[dict[str, str]], blocked: Sequence[bool]) -> dict[str, Any]:
    """`scores` overall and per category, language and evasion kind (a safe row's category is the
    topic it looks like, so a per-category FPR shows which look-alikes fail)."""
    report: dict[str, Any] = {"overall": scores(rows, blocked)}
    for key, group in (("category", "per_category"), ("lang", "per_language"), ("evasion", "per_evasion")):
        values = sorted({row[key] for row in rows if row[key]})
        report[group] = {
            value: scores(
                [row for row in rows if row[key] == value],
                [b for row, b in zip(rows, blocked, strict=True) if row[key] == value],
            )
            for value in values
        }
    return report


def evaluate(
    moderator: Moderator, rows: Sequence[dict[str, str]], clock: Callable[[], int] = time.perf_counter_ns
) -> dict[str, Any]:
    """Check each prompt exactly as the gatekeeper does (`Moderator.check` on the prompt field) and
    report the figures, the latency of each check, and each verdict.

    Every prompt is checked twice: the first pass (``latency_cold_ms``) fills the per-character caches
    a long-running gatekeeper has long filled; the second is its steady state, as wall-clock time
    (``latency_ms``) and as this thread's CPU time (``latency_cpu_ms``, which leaves out the time the
    thread waited for a CPU other processes held). Both passes must give the same verdicts."""
    passes: list[tuple[list[Verdict], list[float], list[float]]] = []
    for _ in range(2):
        verdicts: list[Verdict] = []
        wall_ms: list[float] = []
        cpu_ms: list[float] = []
        for row in rows:
            start, start_cpu = clock(), time.thread_time_ns()
            verdict = moderator.check({"prompt": row["prompt"]})
            cpu_ms.append((time.thread_time_ns() - start_cpu) / 1e6)
            wall_ms.append((clock() - start) / 1e6)
            verdicts.append(verdict)
        passes.append((verdicts, wall_ms, cpu_ms))
    (cold, cold_ms, _), (verdicts, wall_ms, cpu_ms) = passes
    if cold != verdicts:
        raise RuntimeError("moderation gave different verdicts for the same prompts on a second pass")
    report = breakdown(rows, [not v.allowed for v in verdicts])
    report["latency_ms"] = _latency(wall_ms)
    report["latency_cpu_ms"] = _latency(cpu_ms)  # this thread's CPU time: without waits for a busy CPU
    report["latency_cold_ms"] = _latency(cold_ms)
    report["policy_version"] = moderator.policy.version
    report["model_version"] = moderator.model.version if moderator.model is not None else None
    report["verdicts"] = [
        {
            "id": row["id"],
            "blocked": not verdict.allowed,
            "category": verdict.category,
            "reason": verdict.reason,
            "score": verdict.score,
        }
        for row, verdict in zip(rows, verdicts, strict=True)
    ]
    return report


def _latency(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50": _percentile(values, 50),
        "p90": _percentile(values, 90),
        "p99": _percentile(values, 99),
        "max": max(values, default=0.0),
    }


def _pct(value: float | None) -> str:
    return "   -  " if value is None else f"{100 * value:5.1f}%"


def format_report(report: dict[str, Any]) -> Iterable[str]:
    """The report as a table for people: one line per group."""
    yield f"policy {report['policy_version']}, model {report['model_version']}"
    header = f"{'group':<28} {'n':>5} {'unsafe':>6} {'precision':>9} {'recall':>7} {'F1':>7} {'FPR':>7}"
    sections = [("overall", {"all": report["overall"]})] + [
        (name, report[name]) for name in ("per_category", "per_language", "per_evasion")
    ]
    for title, groups in sections:
        yield ""
        yield header.replace("group", title, 1)
        for name, s in groups.items():
            yield (
                f"{name:<28} {s['n']:>5} {s['unsafe']:>6} {_pct(s['precision']):>9} {_pct(s['recall']):>7} "
                f"{_pct(s['f1']):>7} {_pct(s['fpr']):>7}"
            )
    yield ""
    titles = {
        "latency_ms": "wall clock, steady state",
        "latency_cpu_ms": "CPU time of the check, steady state",
        "latency_cold_ms": "wall clock, first pass with cold caches",
    }
    for key, title in titles.items():
        latency = report[key]
        yield (
            f"latency per prompt ({title}): p50 {latency['p50']:.3f} ms, p90 {latency['p90']:.3f} ms, "
            f"p99 {latency['p99']:.3f} ms, max {latency['max']:.3f} ms"
        )
