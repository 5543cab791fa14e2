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
    out = {name: metadata.version(name) for name in PACKAGES}
    out["librdkafka"] = confluent_kafka.libversion()[0]
    for prop in ("kafka.version", "cassandra.version", "s3proxy.version"):
        match = re.search(rf"<{re.escape(prop)}>([^<]+)<", POM.read_text())
        out[prop.split(".")[0]] = match.group(1) if match else "unknown"
    return out


def write(out_dir: Path, results: dict[str, Any], settings: Settings) -> tuple[Path, Path]:
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
    m, v = document["machine"], document["versions"]
    lines = [
        "# Benchmark report",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}, Python {m['python']}.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
    ]
    for name, result in document["results"].items():
        lines += [f"## {name}", "", "| figure | value |", "|---|---|", *_lines("", result), ""]
    return "\n".join(lines)
