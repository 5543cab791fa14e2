"""The gateway stage reports itself listening only once its socket takes connections."""

from __future__ import annotations

import socket

import uvicorn

from plumbing.supervisor import free_port
from producers.gateway.server import ListeningServer


async def app(scope: dict, receive: object, send: object) -> None:  # the smallest ASGI app
    assert scope["type"] == "lifespan"


def test_on_listening_comes_when_the_port_accepts_connections() -> None:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", loop="asyncio")
    seen: list[bool] = []

    def on_listening() -> None:
        with socket.socket() as probe:
            seen.append(probe.connect_ex(("127.0.0.1", port)) == 0)
        server.should_exit = True

    server = ListeningServer(config, on_listening)
    server.run()
    assert seen == [True]
