"""Where a webhook may go: the SSRF filter.

A webhook URL names a host the tenant chose, and the stage POSTs from inside the deployment, so a URL
pointing at loopback, a private network, link-local (cloud metadata at 169.254.169.254), multicast,
reserved or any other non-global address is refused, unless ``webhooks.allow_hosts`` names the host, the
address or a network holding it (tests allow 127.0.0.1). The host is resolved here once, every address it
resolves to must pass, and the POST connects to the address that was checked (`transport`), so a DNS
answer that changes between the check and the connection (rebinding) cannot reach a refused address.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from plumbing.errors import PermanentError, RetryableError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]


class AddressRefused(PermanentError):
    """The URL's host is, or resolves to, an address webhooks may not reach."""

    code = "WEBHOOK_ADDRESS_REFUSED"


class HostUnresolved(RetryableError):
    """The URL's host does not resolve now (DNS may answer later)."""

    code = "WEBHOOK_DNS_FAILED"


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (``address``) and what to say (``host``, ``path``)."""

    scheme: str
    host: str
    port: int
    path: str
    address: str


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the system resolver)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise HostUnresolved(f"{host} does not resolve: {exc}") from None
    return sorted({str(info[4][0]) for info in infos})


class AddressFilter:
    """Checks URLs against the allow-list; non-global addresses are refused unless allowed."""

    def __init__(self, allow: Iterable[str], resolver: Resolver = resolve) -> None:
        self.hosts: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in allow:
            try:
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self.hosts.add(entry.lower().rstrip("."))
        self.resolver = resolver

    def allowed(self, address: IPAddress) -> bool:
        """Whether ``address`` may be reached: allow-listed, or global and not multicast."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
        if any(address in network for network in self.networks):
            return True
        return address.is_global and not address.is_multicast

    def check(self, url: str) -> Target:
        """The target of ``url``, or AddressRefused naming why (HostUnresolved when DNS fails)."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower().rstrip(".")
        if parts.scheme not in ("http", "https") or not host:
            raise AddressRefused(f"{url[:200]!r} is not an http(s) URL with a host")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        addresses = self.resolver(host, port)
        if not addresses:
            raise HostUnresolved(f"{host} resolves to no address")
        if host not in self.hosts:
            for text in addresses:
                address = ipaddress.ip_address(text.split("%", 1)[0])
                if not self.allowed(address):
                    raise AddressRefused(
                        f"{host} resolves to {address}, which is not a global address (loopback, private, "
                        "link-local, multicast or reserved); webhooks.allow_hosts may name it"
                    )
        return Target(parts.scheme, host, port, path, addresses[0])
