"""`aigc gateway`: the HTTP gateway as a pipeline stage (the supervisor starts it like the others).

Serves the API and the console on ``gateway.host:gateway.port`` with uvicorn, and ``/metrics``,
``/healthz`` and ``/readyz`` on the stage's metrics port like every stage; ready once Cassandra is
connected, the Kafka producer reaches the broker, the status topic is followed and the API listens.
SIGTERM or Ctrl-C: uvicorn stops taking connections and finishes the requests in hand, then every
produced request is flushed to the broker before the process exits.
"""

from __future__ import annotations

import gc
import logging
import socket
from collections.abc import Callable

import uvicorn

from plumbing.observability import serve
from plumbing.settings import Settings

log = logging.getLogger(__name__)
LOOP = "uvloop"


def run(settings: Settings) -> None:
    """Run the gateway stage until SIGTERM or Ctrl-C (see the module docstring)."""
    from producers.gateway.app import create_app
    from producers.gateway.backend import Backend

    obs = serve(settings, "gateway", "cassandra", "kafka", "status", "listening")
    backend = Backend(settings)
    obs.readiness.mark("cassandra")
    obs.readiness.check_until_met(
        "kafka", lambda: backend.producer.list_topics(backend.topics.status, timeout=5)
    )
    obs.readiness.check_until_met("status", lambda: _following(backend))
    app = create_app(backend)

    gw = settings.gateway
    config = uvicorn.Config(
        app,
        host=gw.host,
        port=gw.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        loop=LOOP,
    )
    log.info("gateway: the API and the console on http://%s:%d (/docs, /console/)", gw.host, gw.port)
    try:
        ListeningServer(config, lambda: obs.readiness.mark("listening")).run()
    finally:
        backend.close()
        obs.close()


class ListeningServer(uvicorn.Server):
    """A uvicorn server that calls ``on_listening`` once its socket accepts connections.

    FastAPI's startup event runs before uvicorn binds the socket, so readiness marked there let the
    supervisor (and a client) find the stage ready and be refused: a restarted gateway in CI did.
    """

    def __init__(self, config: uvicorn.Config, on_listening: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_listening = on_listening

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's start-up (lifespan, then bind), then ``on_listening`` if the server started."""
        await super().startup(sockets)
        if not self.started:
            return
        # What start-up built (the app, its routes and models, the drivers: some 90,000 objects) lives as
        # long as the process: out of the collector's sight, a full collection no longer walks it all, a
        # pause of tens of milliseconds for every request in flight when it came.
        gc.collect()
        gc.freeze()
        self.on_listening()


def _following(backend: object) -> None:
    if not backend.following.wait(0.5):  # type: ignore[attr-defined]
        raise RuntimeError("the status topic is not followed yet")
