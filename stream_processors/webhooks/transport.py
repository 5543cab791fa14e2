"""One webhook POST over http.client, to the address the filter checked (`addresses.Target`).

The connection goes to ``target.address`` while the Host header, TLS SNI and certificate check use the
URL's host, so what was checked is what is reached. Redirects are not followed (a 3xx is a failed
attempt: following one would reach an unchecked address).
"""

from __future__ import annotations

import http.client
import socket
import ssl
from dataclasses import dataclass

from stream_processors.webhooks.addresses import Target

BODY_EXCERPT_CHARS = 1000  # of a failed answer, kept in the dead letter
USER_AGENT = "aigc-webhooks/1"


@dataclass(frozen=True)
class Answer:
    """What the receiver answered: its status and the start of its body."""

    status: int
    excerpt: str  # the start of the response body, decoded leniently

    @property
    def ok(self) -> bool:
        """Whether the answer is 2xx (a delivery)."""
        return 200 <= self.status < 300


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, target: Target, timeout_s: float, context: ssl.SSLContext | None) -> None:
        context = context or ssl.create_default_context()
        super().__init__(target.host, target.port, timeout=timeout_s, context=context)
        self._address = target.address

    def connect(self) -> None:
        """Connect to the checked address, with TLS for the URL's host."""
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def post(
    target: Target,
    body: bytes,
    headers: dict[str, str],
    timeout_s: float,
    context: ssl.SSLContext | None = None,
) -> Answer:
    """POST ``body`` as JSON; OSError (refused, reset, timed out, a certificate that does not verify) when
    no answer came. ``context``: TLS settings (default: the system's trusted CAs, hostname checked)."""
    conn: http.client.HTTPConnection
    if target.scheme == "https":
        conn = _PinnedHTTPS(target, timeout_s, context)
    else:
        conn = http.client.HTTPConnection(target.address, target.port, timeout=timeout_s)
    try:
        conn.putrequest("POST", target.path, skip_host=True, skip_accept_encoding=True)
        default_port = 443 if target.scheme == "https" else 80
        host = f"[{target.host}]" if ":" in target.host else target.host
        conn.putheader("Host", host if target.port == default_port else f"{host}:{target.port}")
        for name, value in {
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            "User-Agent": USER_AGENT,
            **headers,
        }.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        excerpt = response.read(BODY_EXCERPT_CHARS * 4).decode("utf-8", "replace")[:BODY_EXCERPT_CHARS]
        return Answer(response.status, excerpt)
    except http.client.HTTPException as exc:  # a malformed answer counts as none
        raise ConnectionError(f"bad HTTP answer: {type(exc).__name__}: {exc}") from None
    finally:
        conn.close()
