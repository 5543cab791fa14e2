"""Reading Prometheus back: a small HTTP API client and the check that every dashboard panel has data.

`PromClient` asks Prometheus's ``/api/v1/query`` for instant vectors. `check_dashboard` runs every query of
a Grafana dashboard (infra/grafana/dashboards/*.json) with its variables filled in and says, per panel,
whether it returned a number; the dashboard test runs it against a Prometheus scraping a contract exporter,
and it works the same against a real pipeline, e.g. after ``aigc demo --keep``::

    from infra.promql import PromClient, check_dashboard, load_dashboard
    results = check_dashboard(PromClient("http://127.0.0.1:19090"), load_dashboard(), {"pipeline": "aigc"})
    print([r for r in results if not r.ok])
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parent / "grafana" / "dashboards" / "aigc.json"
# Grafana's own variables, as a check with no Grafana fills them: a rate window several scrapes long.
GRAFANA_DEFAULTS = {"__rate_interval": "1m", "__interval": "15s", "__range": "15m"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


class PromError(RuntimeError):
    """Prometheus could not be reached or refused a query; the message says which and why."""


@dataclass(frozen=True)
class Sample:
    """One series of an instant query's answer: its labels and value."""

    labels: dict[str, str]
    value: float


class PromClient:
    """Instant queries against one Prometheus over its HTTP API."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=self.timeout_s) as resp:  # noqa: S310
                body = json.load(resp)
        except urllib.error.HTTPError as exc:  # 400/422: a bad query, with Prometheus's reason in the body
            try:
                body = json.load(exc)
            except ValueError:
                raise PromError(f"{self.url}{path}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise PromError(f"Prometheus at {self.url} is not reachable: {exc}") from None
        if body.get("status") != "success":
            raise PromError(f"{path}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def ready(self) -> bool:
        """Whether Prometheus answers ``/-/ready`` with 200 now."""
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=self.timeout_s) as resp:  # noqa: S310
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def query(self, expr: str, at: float | None = None) -> list[Sample]:
        """The instant vector (or scalar) of ``expr`` now or at epoch seconds ``at``."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._get("/api/v1/query", params)
        if data["resultType"] == "scalar":
            return [Sample({}, float(data["result"][1]))]
        if data["resultType"] != "vector":
            raise PromError(f"{expr!r} gave a {data['resultType']}, not an instant vector")
        return [Sample(dict(item["metric"]), float(item["value"][1])) for item in data["result"]]

    def value(self, expr: str, default: float = 0.0) -> float:
        """The sum of ``expr``'s samples (``default`` when it has none)."""
        samples = self.query(expr)
        return sum(s.value for s in samples) if samples else default

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets, as ``/api/v1/targets`` lists them."""
        return list(self._get("/api/v1/targets", {"state": "active"})["activeTargets"])

    def alerts(self) -> list[dict[str, Any]]:
        """The pending and firing alerts, as ``/api/v1/alerts`` lists them."""
        return list(self._get("/api/v1/alerts")["alerts"])


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    """The Grafana dashboard JSON at ``path`` (default: the project's dashboard)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a Grafana dashboard (a JSON object)")
    return data


@dataclass(frozen=True)
class PanelQuery:
    """One Prometheus query of a dashboard panel: the panel's title, the query's ref id and expression."""

    panel: str
    ref_id: str
    expr: str


def panel_queries(dashboard: Mapping[str, Any]) -> Iterator[PanelQuery]:
    """Every Prometheus query of every panel, rows' nested panels included."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[PanelQuery]:
        for panel in panels:
            yield from walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                if target.get("expr"):
                    yield PanelQuery(panel.get("title", ""), target.get("refId", "A"), target["expr"])

    yield from walk(dashboard.get("panels", []))


def expand(expr: str, variables: Mapping[str, str]) -> str:
    """``expr`` with Grafana's ``$name``, ``${name}`` and ``[[name]]`` replaced; unknown names stay."""
    values = {**GRAFANA_DEFAULTS, **variables}

    def one(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        return values.get(name, match.group(0))

    return _VARIABLE.sub(one, expr)


@dataclass(frozen=True)
class PanelResult:
    """What one panel query gave: the expression sent, its samples, or the error."""

    query: PanelQuery
    expr: str  # as sent, variables filled in
    samples: tuple[Sample, ...] = ()
    error: str = ""

    @property
    def ok(self) -> bool:
        """The query ran and gave at least one number (NaN is Grafana's "no value")."""
        return not self.error and any(not math.isnan(s.value) for s in self.samples)

    def describe(self) -> str:
        """One line for a report: the panel and query, and what came back (an error, no series, only NaN, or
        how many series)."""
        if self.error:
            return f"{self.query.panel} [{self.query.ref_id}]: {self.error}"
        what = (
            "no series" if not self.samples else "only NaN" if not self.ok else f"{len(self.samples)} series"
        )
        return f"{self.query.panel} [{self.query.ref_id}]: {what}: {self.expr}"


def check_dashboard(
    client: PromClient, dashboard: Mapping[str, Any], variables: Mapping[str, str]
) -> list[PanelResult]:
    """Each panel query run once now; see `PanelResult.ok`."""
    results = []
    for query in panel_queries(dashboard):
        expr = expand(query.expr, variables)
        try:
            results.append(PanelResult(query, expr, tuple(client.query(expr))))
        except PromError as exc:
            results.append(PanelResult(query, expr, error=str(exc)))
    return results


def wait_for_dashboard(
    client: PromClient,
    dashboard: Mapping[str, Any],
    variables: Mapping[str, str],
    timeout_s: float,
    poll_s: float = 1.0,
) -> list[PanelResult]:
    """`check_dashboard` again until every panel has data or ``timeout_s`` passes; the last results."""
    deadline = time.monotonic() + timeout_s
    while True:
        results = check_dashboard(client, dashboard, variables)
        if all(r.ok for r in results) or time.monotonic() >= deadline:
            return results
        time.sleep(poll_s)
