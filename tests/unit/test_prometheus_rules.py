"""The Prometheus rules and configs, checked by Prometheus's own promtool (Debian's package; `make setup`).

`promtool test rules` runs infra/prometheus/rules_test.yml, where every alert is shown firing and staying
quiet on series written for it; `promtool check` validates the rule files, the config `aigc infra up`
writes and the one docker-compose mounts.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.prometheus_server import RULE_FILES, RULES_DIR, Prometheus, find_tool
from plumbing.settings import InfraSettings, Settings

ALERTS = {
    "AigcLagGrowing",
    "AigcHighQueueWaitOverObjective",
    "AigcDeadLetters",
    "AigcStageDown",
    "AigcRenderersIdleWhileQueued",
}


@pytest.fixture(scope="module")
def promtool() -> Path:
    tool = find_tool("promtool")
    assert tool is not None, "promtool is missing: `make setup` installs Debian's prometheus package"
    return tool


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, check=False)


def load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((RULES_DIR / name).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_rule_unit_tests_pass(promtool: Path):
    result = subprocess.run(
        [str(promtool), "test", "rules", "rules_test.yml"],
        cwd=RULES_DIR, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_files_are_valid(promtool: Path):
    result = run(promtool, "check", "rules", *(RULES_DIR / name for name in RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet():
    alerts = {rule["alert"] for group in load("alerts.rules.yml")["groups"] for rule in group["rules"]}
    assert alerts == ALERTS
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in load("rules_test.yml")["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert fired == ALERTS, f"never shown firing: {ALERTS - fired}"
    assert quiet == ALERTS, f"never shown quiet: {ALERTS - quiet}"


def test_the_local_config_is_valid(promtool: Path, tmp_path: Path):
    settings = Settings.load(home=tmp_path / "home", infra=InfraSettings(run_dir=tmp_path / "run"))
    prometheus = Prometheus(settings)
    prometheus.prepare()
    result = run(promtool, "check", "config", prometheus.config_file)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(prometheus.config_file.read_text(encoding="utf-8"))
    sd = config["scrape_configs"][0]["file_sd_configs"][0]["files"]
    assert sd == [str((tmp_path / "home" / "prometheus" / "targets").resolve() / "*.json")]
    assert config["global"]["scrape_interval"] == "1s"


def test_the_compose_config_is_valid(promtool: Path):
    result = run(promtool, "check", "config", RULES_DIR / "prometheus.compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr
