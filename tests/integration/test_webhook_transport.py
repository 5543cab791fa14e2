"""A webhook POST over TLS goes to the address that was checked, while SNI, the Host header and the
certificate check use the URL's host (a local TLS server with a certificate made by openssl)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from stream_processors.webhooks.addresses import Target
from stream_processors.webhooks.transport import post


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path, list[dict[str, Any]]]]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is missing (Debian's openssl package)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=hooks.test",
         "-addext", "subjectAltName=DNS:hooks.test", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    seen: list[dict[str, Any]] = []
    snis: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append({"host": self.headers["Host"], "path": self.path, "body": body, "sni": snis[-1]})
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda _sock, name, _ctx: snis.append(name)  # type: ignore[func-returns-value]
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], cert, seen
    server.shutdown()


def test_tls_goes_to_the_checked_address_with_the_urls_host(tls_server):
    port, cert, seen = tls_server
    trusted = ssl.create_default_context(cafile=str(cert))
    target = Target("https", "hooks.test", port, "/aigc?x=1", "127.0.0.1")  # hooks.test resolves nowhere
    answer = post(target, b'{"a":1}', {"webhook-id": "msg_1"}, 5.0, trusted)
    assert answer.status == 204 and answer.ok
    assert seen == [
        {"host": f"hooks.test:{port}", "path": "/aigc?x=1", "body": b'{"a":1}', "sni": "hooks.test"}
    ]


def test_a_certificate_for_another_host_is_refused(tls_server):
    port, cert, seen = tls_server
    trusted = ssl.create_default_context(cafile=str(cert))
    with pytest.raises(ssl.SSLCertVerificationError):  # an OSError: retried, then dead-lettered
        post(Target("https", "elsewhere.test", port, "/", "127.0.0.1"), b"{}", {}, 5.0, trusted)
    assert seen == []
