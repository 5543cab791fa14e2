"""The benchmark report: a JSON file and a readable markdown page per run, with machine and versions."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any

import confluent_kafka

from plumbing.settings import Settings

PACKAGES = (
    "confluent-kafka",
    "faust-streaming",
    "aiokafka",
    "torch",
    "diffusers",
    "transformers",
    "cassandra-driver",
    "boto3",
    "fastavro",
    "moviepy",
)
POM = Path(__file__).resolve().parent.parent / "infra" / "maven" / "pom.xml"


def machine() -> dict[str, Any]:
    """The CPU, cores, memory, OS and Python the figures were measured on."""
    cpu = "unknown"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    mem_kb = 0
    with contextlib.suppress(OSError, StopIteration):
        mem_kb = int(
            next(
                line.split()[1]
                for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")
            )
        )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    """Versions of the libraries and of Kafka, Cassandra and S3Proxy (from the Maven build)."""
    out = {name: metadata.version(name) for name in PACKAGES}
    out["librdkafka"] = confluent_kafka.libversion()[0]
    for prop in ("kafka.version", "cassandra.version", "s3proxy.version"):
        match = re.search(rf"<{re.escape(prop)}>([^<]+)<", POM.read_text())
        out[prop.split(".")[0]] = match.group(1) if match else "unknown"
    return out


def write(out_dir: Path, results: dict[str, Any], settings: Settings) -> tuple[Path, Path]:
    """Write results.json and report.md into ``out_dir``; their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {
        "machine": machine(),
        "versions": versions(),
        "settings": json.loads(settings.redacted()),
        "results": results,
    }
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(document, indent=2, default=str))
    md_path = out_dir / "report.md"
    md_path.write_text(markdown(document))
    return json_path, md_path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _lines(prefix: str, value: Any) -> list[str]:
    if isinstance(value, dict):
        if set(value) >= {"p50", "p95"}:
            parts = ", ".join(
                f"{k} {_fmt(value[k])}" for k in ("n", "p50", "p95", "p99", "max") if k in value
            )
            return [f"| {prefix} | {parts} |"]
        return [line for k, v in value.items() for line in _lines(f"{prefix}.{k}" if prefix else k, v)]
    return [f"| {prefix} | {_fmt(value)} |"]


def markdown(document: dict[str, Any]) -> str:
    """The report as Markdown: machine, versions, the comparison with the peer, then every figure."""
    m, v = document["machine"], document["versions"]
    lines = [
        "# Benchmark report",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}, Python {m['python']}.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
    ]
    comparison = side_by_side(document["results"])
    if comparison:
        lines += ["## Ours against Celery + Redis (the same synthetic workload)", "", *comparison, ""]
    for name, result in document["results"].items():
        if name == "LEDGER" and isinstance(result, dict) and "image" in result:
            lines += [
                "## LEDGER: what one image request and one video frame cost",
                "",
                *ledger_table(result),
                "",
            ]
            continue
        lines += [f"## {name}", "", "| figure | value |", "|---|---|", *_lines("", result), ""]
    return "\n".join(lines)


def _flat(value: Any, prefix: str = "") -> dict[str, float]:
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, float] = {}
    for key, inner in value.items():
        out.update(_flat(inner, f"{prefix} / {key}" if prefix else key))
    return out


def ledger_table(result: dict[str, Any]) -> list[str]:
    """The ledger as one table (a row per counter; per image request, per video frame) and the idle rates."""
    image = _flat(result["image"].get("per_unit", {}))
    frame = _flat(result.get("video_frame", {}).get("per_unit", {}))
    above = {
        f"cpu ms above idle / {k}": (
            result["image"].get("cpu_ms_above_idle", {}).get(k),
            result.get("video_frame", {}).get("cpu_ms_above_idle", {}).get(k),
        )
        for k in result["image"].get("cpu_ms_above_idle", {})
    }
    video = result.get("video_frame", {})
    rows = [
        f"Completed: {result['image'].get('units')} of {result['image'].get('sent')} image requests in "
        f"{result['image'].get('window_s', 0):.0f} s; {video.get('completed_videos')} of {video.get('sent')} "
        f"videos, {video.get('units')} frames, in {video.get('window_s', 0):.0f} s. Records are end-offset "
        "deltas (transaction markers included); bytes are the partition logs on the broker's disk; topics "
        "marked broker-wide and system.paxos count every client of the shared services.",
        "",
        "| counter (family / kind) | per image request | per video frame |",
        "|---|---|---|",
    ]
    for key in sorted(set(image) | set(frame), key=lambda k: (k.split(" / ")[0], k)):
        rows.append(f"| {key} | {_fmt(image.get(key, '-'))} | {_fmt(frame.get(key, '-'))} |")
    for key, (a, b) in above.items():
        rows.append(f"| {key} | {_fmt(a if a is not None else '-')} | {_fmt(b if b is not None else '-')} |")
    idle = result.get("idle", {})
    rows += [
        "",
        f"Idle, pipeline up and no load ({idle.get('window_s', 0):.0f} s; the broker holds "
        f"{idle.get('broker_partitions')} partition directories), per second:",
        "",
        "| counter | per second |",
        "|---|---|",
        *(f"| {k} | {_fmt(v)} |" for k, v in _flat(idle.get("per_second", {})).items()),
    ]
    rows += ["", "| figure | value |", "|---|---|", *_lines("workload", result.get("workload", {}))]
    return rows


SIDE_BY_SIDE = (
    ("B1 overhead p50 / p99 at 10% load (ms)", ("B1", "load_10pct", "overhead_ms")),
    ("B1 overhead p50 / p99 at 50% load (ms)", ("B1", "load_50pct", "overhead_ms")),
    ("B3 HIGH queue wait p50 / p99, no LOW (ms)", ("B3", "baseline", "high_queue_wait_ms")),
    ("B3 HIGH e2e p50 / p99, no LOW (ms)", ("B3", "baseline", "high_e2e_ms")),
    ("B3 HIGH queue wait p50 / p99, LOW flood (ms)", ("B3", "flood", "high_queue_wait_ms")),
    ("B3 HIGH e2e p50 / p99, LOW flood (ms)", ("B3", "flood", "high_e2e_ms")),
)


def side_by_side(results: dict[str, Any]) -> list[str]:
    """Markdown rows comparing our B1-B3 with the peer's, where both ran."""
    peer_results = results.get("PEER")
    if not isinstance(peer_results, dict) or "B1" not in peer_results:
        return []

    def dig(root: Any, path: tuple[str, ...]) -> Any:
        for key in path:
            root = root.get(key) if isinstance(root, dict) else None
        return root

    def pct(value: Any) -> str:
        if not isinstance(value, dict) or value.get("p50") is None:
            return "-"
        return f"{value['p50']:.0f} / {value['p99']:.0f} (n {value.get('n', '?')})"

    rows = ["| figure | ours | Celery + Redis |", "|---|---|---|"]
    for label, path in SIDE_BY_SIDE:
        rows.append(f"| {label} | {pct(dig(results, path))} | {pct(dig(peer_results, path))} |")
    for variant in ("baseline", "flood"):
        ours, theirs = dig(results, ("B3", variant)), dig(peer_results, ("B3", variant))
        counts = [
            f"{d.get('high_completed', '-')} of {d.get('high_requests', '-')}" if isinstance(d, dict) else "-"
            for d in (ours, theirs)
        ]
        rows.append(f"| B3 HIGH completed, {variant} | {counts[0]} | {counts[1]} |")
    ours_b2, theirs_b2 = dig(results, ("B2", "completed_per_s")), dig(peer_results, ("B2", "completed_per_s"))
    rows.append(
        "| B2 completed requests/s, 0 ms service | "
        + " | ".join(f"{v:.0f}" if isinstance(v, float) else "-" for v in (ours_b2, theirs_b2))
        + " |"
    )
    return rows
