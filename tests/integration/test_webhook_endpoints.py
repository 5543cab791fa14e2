"""`aigc webhooks set | show | rotate-secret` on a real Cassandra: a secret is made once and shown once,
URLs are validated, rotation replaces the secret; delivered rows are what the stage checks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from aigc.cli import main
from infra.bootstrap import cql_statements
from plumbing.metadata import connect
from plumbing.settings import Settings
from stream_processors.webhooks.store import WebhookStore
from tests.conftest import unique


@pytest.fixture
def settings(infra: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    keyspace = unique("ks")
    settings = infra.model_copy(
        update={"cassandra": infra.cassandra.model_copy(update={"keyspace": keyspace})}
    )
    for name, value in settings.to_env().items():  # what `aigc` reads at its entry point
        monkeypatch.setenv(name, value)
    cluster, session = connect(settings.cassandra)
    for statement in cql_statements(settings):  # the keyspace and the webhook tables: all this test needs
        if "KEYSPACE" in statement or "webhook_" in statement:
            session.execute(statement, timeout=60)
    cluster.shutdown()
    yield settings
    cluster, session = connect(settings.cassandra)
    session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)
    cluster.shutdown()


def aigc(capfd: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        code = main(["webhooks", *argv])
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
        print(exc.code)
    return code, capfd.readouterr().out


def test_set_show_and_rotate_a_tenants_webhook(settings: Settings, capfd: pytest.CaptureFixture[str]):
    cluster, session = connect(settings.cassandra)
    store = WebhookStore(session, settings.cassandra.keyspace)
    try:
        assert aigc(capfd, "show", "acme") == (1, "acme: default URL -, secret -\n")

        code, out = aigc(capfd, "set", "acme", "--url", "https://hooks.example.com/a")
        secret = store.endpoint("acme").secret
        assert code == 0 and secret is not None and secret.startswith("whsec_")
        assert f"shown once, keep it): {secret}" in out  # the whole secret, this once

        code, out = aigc(capfd, "set", "acme", "--url", "https://hooks.example.com/b")
        assert code == 0 and secret not in out and "unchanged" in out
        assert store.endpoint("acme") == store.endpoint("acme").__class__(
            "acme", "https://hooks.example.com/b", secret
        )

        code, out = aigc(capfd, "show", "acme")
        assert code == 0 and "https://hooks.example.com/b" in out and secret not in out and secret[:10] in out

        code, out = aigc(capfd, "rotate-secret", "acme")
        rotated = store.endpoint("acme").secret
        assert code == 0 and rotated != secret and rotated is not None and rotated in out

        code, out = aigc(capfd, "set", "acme", "--url", "ftp://hooks.example.com/")
        assert code != 0 and "INVALID" not in out and "http or https" in out
        assert store.endpoint("acme").url == "https://hooks.example.com/b"  # unchanged

        assert not store.delivered("r-1")
        store.mark_delivered("r-1", "acme", "https://hooks.example.com/b", 204, 2)
        assert store.delivered("r-1")
    finally:
        cluster.shutdown()
