"""Prometheus as a local service beside Kafka, Cassandra and S3Proxy: `aigc infra up` starts it.

Debian's ``prometheus`` binary (``make setup`` installs it) runs unprivileged on 127.0.0.1 with a config,
data and log under ``<run dir>/prometheus``. It finds what to scrape by file-based service discovery in
``<home>/prometheus/targets/*.json``, which the supervisor keeps current as stages start and stop (one
file per pipeline, named for its topic prefix; see the metrics contract), and it evaluates the recording
and alert rules of ``infra/prometheus/*.rules.yml`` at the scrape interval.
"""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from typing_extensions import override

from infra.services import LOOPBACK, Service
from plumbing.settings import Settings

RULES_DIR = Path(__file__).resolve().parent / "prometheus"
RULE_FILES = ("recording.rules.yml", "alerts.rules.yml")
JOB = "aigc"  # the scrape job of every stage: `up{job="aigc"}`
# Where install-tools.sh unpacks Debian's package when apt-get cannot install it (not root).
UNPACKED_BIN = Path(__file__).resolve().parent / "tools" / "usr" / "bin"


def find_tool(name: str) -> Path | None:
    """``prometheus`` or ``promtool``: on PATH, else unpacked into infra/tools; None when neither."""
    found = shutil.which(name)
    if found:
        return Path(found)
    unpacked = UNPACKED_BIN / name
    return unpacked if unpacked.is_file() else None


def targets_dir(settings: Settings) -> Path:
    """The folder of file-SD JSON files the supervisor writes and Prometheus watches."""
    return settings.home.resolve() / "prometheus" / "targets"


def prometheus_url(settings: Settings) -> str:
    """The local Prometheus's base URL."""
    return f"http://{LOOPBACK}:{settings.infra.prometheus_port}"


def scrape_config(settings: Settings) -> dict[str, object]:
    """The prometheus.yml of a local run: every stage listed in the targets folder, and itself."""
    interval = f"{settings.infra.prometheus_scrape_interval_s:g}s"
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "rule_files": [str(RULES_DIR / name) for name in RULE_FILES],
        "scrape_configs": [
            {
                "job_name": JOB,
                # A few metrics carry a `stage` label of their own (the stage that dead-lettered or routed a
                # message); theirs wins over the target's file-SD `stage` instead of becoming exported_stage.
                "honor_labels": True,
                "file_sd_configs": [
                    {"files": [str(targets_dir(settings) / "*.json")], "refresh_interval": "5s"}
                ],
            },
            {
                "job_name": "prometheus",
                "static_configs": [{"targets": [f"{LOOPBACK}:{settings.infra.prometheus_port}"]}],
            },
        ],
    }


class Prometheus(Service):
    """Prometheus, the native binary infra/install-tools.sh installs, scraping the stages the supervisor
    lists."""

    name = "prometheus"
    main_class = ""  # not a JVM

    @property
    @override
    def ports(self) -> tuple[int, ...]:
        return (self.settings.infra.prometheus_port,)

    @property
    def config_file(self) -> Path:
        """The ``prometheus.yml`` `prepare` writes (scrape configuration and rule files)."""
        return self.dir / "prometheus.yml"

    @override
    def prepare(self) -> None:
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        targets_dir(self.settings).mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(
            "# written by aigc infra (infra/prometheus_server.py)\n"
            + yaml.safe_dump(scrape_config(self.settings), sort_keys=False),
            encoding="utf-8",
        )

    @override
    def java_args(self) -> list[str]:
        return []

    @override
    def command(self) -> list[str]:
        binary = find_tool("prometheus")
        if binary is None:
            raise FileNotFoundError("no prometheus binary: run `make setup` (infra/install-tools.sh) first")
        return [
            str(binary),
            f"--config.file={self.config_file}",
            f"--web.listen-address={LOOPBACK}:{self.ports[0]}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--storage.tsdb.retention.time={self.settings.infra.prometheus_retention}",
            "--web.enable-lifecycle",  # POST /-/reload re-reads the config and the rules
            "--log.level=warn",
        ]

    @override
    def owns(self, args: list[str]) -> bool:
        # Prometheus takes no free-form flags, but its config file lies in this run directory.
        config = f"--config.file={self.config_file}"
        return bool(args) and Path(args[0]).name == "prometheus" and config in args

    @override
    def check_jars(self) -> None:
        if find_tool("prometheus") is None:
            raise FileNotFoundError("no prometheus binary: run `make setup` (infra/install-tools.sh) first")

    @override
    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{self.ports[0]}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False
