"""The stages' metrics read back: raw snapshots from Prometheus or straight from the stages, and the figures
`aigc top` and the demo's summary show.

A `Snapshot` is every ``aigc_*`` sample (and ``up``) of one pipeline at one moment, with its target labels
(``stage``, ``instance_name``, ``pipeline`` from the file-SD JSON the supervisor writes). It comes from the
local Prometheus's HTTP API (`prometheus_snapshot`, any past moment too) or, when Prometheus is not running,
from scraping the targets in ``<home>/prometheus/targets/*.json`` directly (`scrape_snapshot`). Every
figure is computed here from two snapshots, so both sources give the same numbers: rates are counter
increases over the time between them, quantiles are interpolated from histogram bucket increases as
Prometheus's histogram_quantile does. A counter that went down (a restarted stage) counts from zero.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from infra.prometheus_server import prometheus_url, targets_dir
from infra.promql import PromClient, PromError
from plumbing.settings import Settings

PRIORITIES = ("HIGH", "NORMAL", "LOW")
SCRAPE_TIMEOUT_S = 2.0
Key = tuple[tuple[str, str], ...]  # a series' labels, sorted


def _key(labels: Mapping[str, str]) -> Key:
    return tuple(sorted(labels.items()))


@dataclass
class Snapshot:
    """Samples of one moment: metric name -> series labels -> value."""

    at: float
    series: dict[str, dict[Key, float]] = field(default_factory=lambda: defaultdict(dict))

    def add(self, name: str, labels: Mapping[str, str], value: float) -> None:
        """Record the value of series ``labels`` of metric ``name``."""
        self.series[name][_key(labels)] = value

    def values(self, name: str) -> dict[Key, float]:
        """Every series of metric ``name`` (empty when it has none)."""
        return self.series.get(name, {})


def _labels(key: Key) -> dict[str, str]:
    return dict(key)


def _increase(new: float, old: float | None) -> float:
    if old is None:
        return new  # a series born between the snapshots: counters start at zero
    return new - old if new >= old else new  # a reset: the stage restarted


def increase_by(
    old: Snapshot | None,
    new: Snapshot,
    name: str,
    by: Iterable[str],
    where: Callable[[dict[str, str]], bool] = lambda _: True,
) -> dict[tuple[str, ...], float]:
    """Increase of counter ``name`` between the snapshots, summed by the label names ``by``.

    With no old snapshot, the totals themselves (the increase since each stage started)."""
    by = tuple(by)
    before = old.values(name) if old is not None else {}
    out: dict[tuple[str, ...], float] = defaultdict(float)
    for key, value in new.values(name).items():
        labels = _labels(key)
        if where(labels):
            out[tuple(labels.get(b, "") for b in by)] += _increase(value, before.get(key))
    return dict(out)


def gauge_by(
    snapshot: Snapshot, name: str, by: Iterable[str], agg: Callable[[list[float]], float] = sum
) -> dict[tuple[str, ...], float]:
    """Gauge ``name`` of the snapshot, its series combined by ``agg`` (sum by default) by the label names
    ``by``."""
    by = tuple(by)
    groups: dict[tuple[str, ...], list[float]] = defaultdict(list)
    for key, value in snapshot.values(name).items():
        labels = _labels(key)
        groups[tuple(labels.get(b, "") for b in by)].append(value)
    return {k: agg(v) for k, v in groups.items()}


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float:
    """Prometheus's histogram_quantile over cumulative bucket counts {upper bound: count}; NaN if empty."""
    bounds = sorted(buckets)
    if not bounds or bounds[-1] != math.inf:
        return math.nan
    total = buckets[math.inf]
    if total <= 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == math.inf:
                return lower  # the highest finite bound, as Prometheus answers
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return math.nan


def quantile_by(
    old: Snapshot | None, new: Snapshot, histogram: str, q: float, by: Iterable[str]
) -> dict[tuple[str, ...], float]:
    """The ``q`` quantile of histogram ``histogram``'s observations between the snapshots, by labels."""
    by = tuple(by)
    bucket_sets: dict[tuple[str, ...], dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for (*group, le), value in increase_by(old, new, f"{histogram}_bucket", (*by, "le")).items():
        bucket_sets[tuple(group)][float(le)] += value
    return {group: histogram_quantile(q, buckets) for group, buckets in bucket_sets.items()}


def mean_by(
    old: Snapshot | None, new: Snapshot, histogram: str, by: Iterable[str]
) -> dict[tuple[str, ...], float]:
    """The mean of histogram ``histogram``'s observations between the snapshots, by labels (groups with no
    observation are left out)."""
    sums = increase_by(old, new, f"{histogram}_sum", by)
    counts = increase_by(old, new, f"{histogram}_count", by)
    return {k: sums.get(k, 0.0) / n for k, n in counts.items() if n > 0}


# --- sources ----------------------------------------------------------------------------------------------


def prometheus_snapshot(client: PromClient, pipeline: str, at: float | None = None) -> Snapshot:
    """Every aigc_* series and `up` of ``pipeline`` as Prometheus last saw them (at epoch ``at``)."""
    when = time.time() if at is None else at
    snapshot = Snapshot(when)
    selector = f'{{__name__=~"aigc_.+|up", job!="prometheus", pipeline="{pipeline}"}}'
    for sample in client.query(selector, at=when):
        labels = dict(sample.labels)
        name = labels.pop("__name__")
        snapshot.add(name, labels, sample.value)
    return snapshot


@dataclass(frozen=True)
class Target:
    """A stage's metrics endpoint (``host:port``) and its file-SD labels."""

    address: str
    labels: dict[str, str]


def read_targets(settings: Settings, pipeline: str) -> list[Target]:
    """The file-SD entries of ``pipeline`` under ``<home>/prometheus/targets``."""
    targets: list[Target] = []
    for path in sorted(targets_dir(settings).glob("*.json")):
        try:
            groups = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # being replaced (the supervisor renames a new file over it) or not ours
        for group in groups:
            labels = {str(k): str(v) for k, v in group.get("labels", {}).items()}
            if labels.get("pipeline") == pipeline:
                targets.extend(Target(str(address), labels) for address in group.get("targets", []))
    return targets


def scrape_snapshot(targets: Iterable[Target]) -> Snapshot:
    """Each target's /metrics now, with its file-SD labels (a metric's own label wins, as in Prometheus's
    honor_labels); a target that does not answer gets ``up`` 0."""
    from prometheus_client.parser import text_string_to_metric_families

    snapshot = Snapshot(time.time())
    for target in targets:
        base = {**target.labels, "instance": target.address}
        try:
            url = f"http://{target.address}/metrics"
            with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as resp:
                text = resp.read().decode("utf-8", "replace")
        except OSError:
            snapshot.add("up", base, 0.0)
            continue
        snapshot.add("up", base, 1.0)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("aigc_") and not sample.name.endswith("_created"):
                    snapshot.add(sample.name, {**base, **sample.labels}, float(sample.value))
    return snapshot


class Source:
    """Where `aigc top` reads: the local Prometheus when it answers, else the stages themselves."""

    def __init__(self, settings: Settings, pipeline: str, prometheus: str | None = None) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.client = PromClient(prometheus or prometheus_url(settings))
        self.scraped: deque[Snapshot] = deque()

    @property
    def uses_prometheus(self) -> bool:
        """Whether the local Prometheus answers now."""
        return self.client.ready()

    def describe(self) -> str:
        """Where the figures come from, for a heading."""
        if self.uses_prometheus:
            return f"Prometheus at {self.client.url}"
        return f"scraping the stages in {targets_dir(self.settings)} (no Prometheus at {self.client.url})"

    def pair(self, window_s: float) -> tuple[Snapshot | None, Snapshot]:
        """Two snapshots about ``window_s`` apart, the later one now. From Prometheus both come at once; from
        the stages the earlier one is the oldest kept of earlier calls within the window (the first call
        scrapes twice, a second apart)."""
        if self.uses_prometheus:
            try:
                now = time.time()
                return (
                    prometheus_snapshot(self.client, self.pipeline, now - window_s),
                    prometheus_snapshot(self.client, self.pipeline, now),
                )
            except PromError:
                pass  # it went away between the two questions: read the stages this time
        if not self.scraped:
            self.scraped.append(scrape_snapshot(read_targets(self.settings, self.pipeline)))
            time.sleep(min(window_s, 1.0))
        new = scrape_snapshot(read_targets(self.settings, self.pipeline))
        while len(self.scraped) > 1 and new.at - self.scraped[1].at >= window_s:
            self.scraped.popleft()
        self.scraped.append(new)
        return self.scraped[0], new
