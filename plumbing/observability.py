"""Each stage process's HTTP face: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``.

A stage's entry point calls `serve` once with its settings and stage name. The server listens on
``AIGC_METRICS_PORT`` (`Settings.metrics_port`; the supervisor picks a free loopback port per process)
at ``observability.metrics_host``; with no port set, nothing listens and the stage runs as before.

- ``/healthz``: 200 while the process answers at all.
- ``/readyz``: 200 once every condition the stage named is met (`Readiness`: assigned or subscribed,
  connected to Kafka and storage, model loaded), else 503 with JSON naming the unmet ones. A condition
  may also go back to unmet (a faust rebalance), so the answer is always the present one.
- ``/metrics``: the process's registry in the Prometheus text format.

Metric names follow the contract in the obs notes (``aigc_`` prefix, units in names, ``_total``
counters, histograms with `LATENCY_BUCKETS`); no label ever carries a request id or another unbounded
value. ``observability.metrics=false`` turns the stages' instrumentation into no-ops (`enabled`), for
measuring what metrics cost; health and readiness are served either way.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import REGISTRY, Gauge, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from plumbing import tracing
from plumbing.settings import Settings

log = logging.getLogger(__name__)

# 5 ms to 60 s, as the contract and the issue ask: a render step, an admission and a video all resolve.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PRIORITY_LABELS = ("HIGH", "NORMAL", "LOW")

STAGE_READY = Gauge("aigc_stage_ready", "1 when this stage's /readyz answers 200, else 0")

_switch = {"metrics": True}  # set once by `configure` at a stage's start


def enabled() -> bool:
    """Whether stages record metrics (``observability.metrics``; on unless switched off)."""
    return _switch["metrics"]


def priority_label(value: object) -> str:
    """A priority as a label value: HIGH, NORMAL or LOW, anything else as NORMAL (the schema's default).

    Labels must stay bounded: a value read from a message is never put in a label unchecked."""
    text = str(value).upper() if value is not None else ""
    return text if text in PRIORITY_LABELS else "NORMAL"


def bounded(value: object, allowed: Iterable[str], other: str = "other") -> str:
    """``value`` when it is one of ``allowed``, else ``other``: how a free-form value becomes a label."""
    text = "" if value is None else str(value)
    return text if text in allowed else other


class Readiness:
    """Named conditions a stage marks met (or unmet again); ready when all are met. Thread-safe."""

    def __init__(self, *conditions: str) -> None:
        self._lock = threading.Lock()
        self._met: dict[str, bool] = dict.fromkeys(conditions, False)

    def require(self, *conditions: str) -> None:
        """Add conditions (unmet until marked)."""
        with self._lock:
            for name in conditions:
                self._met.setdefault(name, False)
        self._publish()

    def mark(self, condition: str, met: bool = True) -> None:
        """Mark ``condition`` met (or unmet again); a change is logged."""
        with self._lock:
            changed = self._met.get(condition) is not met
            self._met[condition] = met
        if changed:
            log.info("readiness: %s %s", condition, "met" if met else "unmet")
            self._publish()

    def unmet(self) -> list[str]:
        """The conditions not met now, sorted."""
        with self._lock:
            return sorted(name for name, met in self._met.items() if not met)

    @property
    def ready(self) -> bool:
        """Whether every condition is met."""
        return not self.unmet()

    def conditions(self) -> dict[str, bool]:
        """Every condition and whether it is met."""
        with self._lock:
            return dict(self._met)

    def check_until_met(self, condition: str, check: Callable[[], object], interval_s: float = 2.0) -> None:
        """Run ``check`` in a daemon thread until it returns without raising, then mark ``condition``."""
        self.require(condition)
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    check()
                except Exception as exc:  # noqa: BLE001 - not reachable yet: say so and ask again
                    log.info("readiness: %s not yet (%s)", condition, exc)
                    stop.wait(interval_s)
                    continue
                self.mark(condition)
                return

        threading.Thread(target=loop, name=f"ready-{condition}", daemon=True).start()

    def _publish(self) -> None:
        STAGE_READY.set(1 if self.ready else 0)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b'{"alive": true}\n', "application/json")
        elif path == "/readyz":
            readiness = self.server.readiness
            unmet = readiness.unmet()
            body = {"ready": not unmet, "stage": self.server.stage, "unmet": unmet,
                    "conditions": readiness.conditions()}  # fmt: skip
            self._send(503 if unmet else 200, (json.dumps(body) + "\n").encode(), "application/json")
        else:
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not news


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], readiness: Readiness, stage: str) -> None:
        self.readiness = readiness
        self.stage = stage
        super().__init__(address, _Handler)


class Observability:
    """What `serve` returns: the stage's readiness and, when a port was given, its HTTP server."""

    def __init__(self, stage: str, readiness: Readiness, server: _Server | None) -> None:
        self.stage = stage
        self.readiness = readiness
        self.server = server

    @property
    def port(self) -> int | None:
        """The port the HTTP server listens on; None without a server."""
        return self.server.server_address[1] if self.server is not None else None

    def close(self) -> None:
        """Stop the HTTP server, if there is one."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def configure(settings: Settings) -> None:
    """Switch the stages' instrumentation on or off from ``observability.metrics``."""
    _switch["metrics"] = settings.observability.metrics


def serve(settings: Settings, stage: str, *conditions: str) -> Observability:
    """Start this process's HTTP server (if ``metrics_port`` is set) with readiness ``conditions``, and its
    span exporter if an OTLP endpoint is configured (`plumbing.tracing`)."""
    configure(settings)
    disable_created_metrics()  # no `_created` twin for every counter and histogram: half the series
    tracing.setup(settings, stage)
    readiness = Readiness(*conditions)
    readiness.require()  # publishes aigc_stage_ready 0 (or 1 when nothing is required)
    server = None
    if settings.metrics_port is not None:
        server = _Server((settings.observability.metrics_host, settings.metrics_port), readiness, stage)
        threading.Thread(target=server.serve_forever, name="observability", daemon=True).start()
        log.info(
            "%s serves /metrics, /healthz and /readyz on http://%s:%d",
            stage,
            settings.observability.metrics_host,
            server.server_address[1],
        )
    return Observability(stage, readiness, server)
