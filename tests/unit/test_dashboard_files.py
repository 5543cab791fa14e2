"""The Grafana dashboard and the compose wiring of Prometheus and Grafana hold together (no Docker needed).

Whether each panel's query returns data is tests/integration/test_dashboard.py's job, on a live Prometheus.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from infra.prometheus_server import RULE_FILES, RULES_DIR
from infra.promql import DASHBOARD, expand, load_dashboard, panel_queries

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "infra" / "grafana"


def compose_services() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))["services"]


def mounts(service: dict[str, Any]) -> dict[PurePosixPath, Path]:
    """Container path -> the repository folder bound there."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            out[PurePosixPath(target)] = REPO / source
    return out


def test_every_panel_uses_the_provisioned_datasource_and_the_pipeline_variable():
    dashboard = load_dashboard()
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    uids = {ds["uid"] for ds in datasources["datasources"]}
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["pipeline"]
    queries = list(panel_queries(dashboard))
    assert queries
    for query in queries:
        assert "$pipeline" in query.expr, f"{query.panel}: not narrowed to the chosen pipeline"
        assert "$" not in expand(query.expr, {"pipeline": "p"}), query.expr
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] in uids, panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_compose_mounts_the_config_rules_and_dashboards():
    services = compose_services()
    prometheus = services["prometheus"]
    bound = mounts(prometheus)
    assert bound[PurePosixPath("/etc/prometheus")] == RULES_DIR
    config = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    assert (RULES_DIR / PurePosixPath(config).relative_to("/etc/prometheus")).is_file()
    compose_config = yaml.safe_load((RULES_DIR / "prometheus.compose.yml").read_text())
    assert compose_config["rule_files"] == list(RULE_FILES)

    grafana = services["grafana"]
    bound = mounts(grafana)
    assert bound[PurePosixPath("/etc/grafana/provisioning")] == GRAFANA / "provisioning"
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/aigc.yml").read_text())["providers"][0]
    folder = PurePosixPath(provider["options"]["path"])
    assert bound[folder] == DASHBOARD.parent
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    home = PurePosixPath(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert bound[home.parent] / home.name == DASHBOARD
