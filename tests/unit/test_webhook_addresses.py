"""The webhook SSRF filter: non-global addresses refused unless allow-listed; every resolved address
counts; the checked address is the one connected to."""

from __future__ import annotations

import pytest

from plumbing.errors import ErrorKind, classify
from stream_processors.webhooks.addresses import AddressFilter, AddressRefused, HostUnresolved


def fixed(table: dict[str, list[str]]):
    """A resolver answering from ``table`` (pure logic: no DNS)."""

    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise HostUnresolved(f"{host} does not resolve")
        return table[host]

    return resolve


DNS = fixed(
    {
        "hooks.example.com": ["93.184.216.34"],
        "localhost": ["127.0.0.1", "::1"],
        "metadata.internal": ["169.254.169.254"],
        "sneaky.example.com": ["93.184.216.34", "10.0.0.5"],  # one public, one private answer
        "127.0.0.1": ["127.0.0.1"],
        "10.1.2.3": ["10.1.2.3"],
        "::ffff:127.0.0.1": ["::ffff:127.0.0.1"],
        "2606:4700::1111": ["2606:4700::1111"],
    }
)


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:8080/",
        "http://127.0.0.1/",
        "http://10.1.2.3/",
        "http://metadata.internal/latest/meta-data",
        "http://sneaky.example.com/",
        "http://[::ffff:127.0.0.1]/",
    ],
)
def test_non_global_addresses_are_refused(url):
    with pytest.raises(AddressRefused) as err:
        AddressFilter([], DNS).check(url)
    assert err.value.code == "WEBHOOK_ADDRESS_REFUSED" and classify(err.value) is ErrorKind.PERMANENT


@pytest.mark.parametrize(
    ("ip", "refused"),
    [
        ("0.0.0.0", True),
        ("100.64.0.1", True),  # carrier-grade NAT
        ("192.168.1.1", True),
        ("172.16.0.1", True),
        ("224.0.0.1", True),  # multicast
        ("240.0.0.1", True),  # reserved
        ("255.255.255.255", True),
        ("fe80::1", True),  # link-local
        ("fc00::1", True),  # unique local
        ("ff02::1", True),  # multicast
        ("8.8.8.8", False),
        ("2606:4700::1111", False),
    ],
)
def test_each_kind_of_address(ip, refused):
    import ipaddress

    assert AddressFilter([]).allowed(ipaddress.ip_address(ip)) is not refused


def test_a_global_host_passes_and_the_target_is_the_address_checked():
    target = AddressFilter([], DNS).check("https://hooks.example.com/aigc?x=1")
    assert (target.scheme, target.host, target.port, target.path, target.address) == (
        "https",
        "hooks.example.com",
        443,
        "/aigc?x=1",
        "93.184.216.34",
    )


def test_the_allow_list_names_addresses_networks_or_hosts():
    assert AddressFilter(["127.0.0.1"], DNS).check("http://127.0.0.1:9000/h").address == "127.0.0.1"
    assert AddressFilter(["10.0.0.0/8"], DNS).check("http://10.1.2.3/").address == "10.1.2.3"
    assert AddressFilter(["localhost"], DNS).check("http://localhost:8080/").host == "localhost"
    # localhost also resolves to ::1, which an allowed 127.0.0.1 does not cover
    with pytest.raises(AddressRefused):
        AddressFilter(["127.0.0.1"], DNS).check("http://localhost:8080/")


def test_a_host_that_does_not_resolve_is_retryable():
    with pytest.raises(HostUnresolved) as err:
        AddressFilter([], DNS).check("https://nowhere.example.com/")
    assert classify(err.value) is ErrorKind.RETRYABLE
