"""Test tiers and the real infrastructure they share.

`tests/unit` needs nothing. `tests/integration` and `tests/e2e` need Kafka, Cassandra and S3: the
``infra`` fixture starts them once per test session on test ports (29092, 29042, 29000), with
Prometheus on 29090, in a temporary run directory and stops them at the end; the processes are tied to
this pytest process, so even a killed test run leaves none behind. ``AIGC_INFRA__BROKERS=3`` (or
``pytest --brokers 3``) runs the 3-broker KRaft cluster instead of the one broker: nodes kafka-1..3 on
29092/29102/29112 (controllers 29093/29103/29113), topics replicated 3 ways with min.insync.replicas 2.
Tests that need only Prometheus use the ``prometheus`` fixture, which starts only it (the ``infra``
fixture then finds it running). To use an
already running set instead, export ``AIGC_TEST_EXTERNAL=1`` together with the usual
``AIGC_KAFKA__BOOTSTRAP_SERVERS``, ``AIGC_CASSANDRA__PORT``, ``AIGC_S3__ENDPOINT_URL`` and
``AIGC_INFRA__PROMETHEUS_PORT``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from plumbing.settings import (
    CassandraSettings,
    InfraSettings,
    KafkaSettings,
    S3Settings,
    Settings,
)

REPO = Path(__file__).resolve().parent.parent
TEST_PORTS = {
    "kafka": 29092,
    "controller": 29093,
    "cql": 29042,
    "storage": 27000,
    "s3": 29000,
    "prometheus": 29090,
}
# The kafka_cluster fixture's nodes kafka-1..3: clients on 29122/29132/29142, controllers on 29123/...
CLUSTER_PORTS = {"kafka": 29122, "controller": 29123}


_INFRA_REPORT: list[str] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--brokers",
        type=int,
        choices=(1, 3),
        default=None,
        help="Kafka brokers of the session's infra: 3 runs the KRaft cluster (default AIGC_INFRA__BROKERS, "
        "else 1)",
    )


_BROKERS_FROM_ENV = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    # AIGC_INFRA__BROKERS picks the session's infra only: tests that read the environment see the defaults.
    config.stash[_BROKERS_FROM_ENV] = os.environ.pop("AIGC_INFRA__BROKERS", "1")


def session_brokers(config: pytest.Config) -> int:
    """The broker count of the session's infra: ``--brokers``, else AIGC_INFRA__BROKERS, else 1."""
    option = config.getoption("--brokers")
    return int(option if option is not None else config.stash[_BROKERS_FROM_ENV])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _INFRA_REPORT:
        terminalreporter.section("local infrastructure")
        for line in _INFRA_REPORT:
            terminalreporter.write_line(line)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath))
        if "integration" in path.parts:
            item.add_marker(pytest.mark.integration)
        if "e2e" in path.parts:
            item.add_marker(pytest.mark.e2e)
        if "chaos" in path.parts:
            item.add_marker(pytest.mark.chaos)


def unique(prefix: str = "t") -> str:
    """A short unique lowercase name for a test's topics, groups, keyspaces and buckets."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def test_settings(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Settings:
    """The session's settings: test ports and a temporary home and run directory (or the environment's);
    with 3 brokers the bootstrap servers list all three (29092, 29102, 29112)."""
    brokers = session_brokers(pytestconfig)
    if os.environ.get("AIGC_TEST_EXTERNAL") == "1":
        return Settings.load(infra={"brokers": brokers})
    if brokers != 1:
        _INFRA_REPORT.append(f"Kafka: {brokers} brokers (KRaft cluster)")
    run_dir = tmp_path_factory.mktemp("infra")
    return Settings.load(
        home=run_dir / "home",
        kafka=KafkaSettings(
            bootstrap_servers=f"127.0.0.1:{TEST_PORTS['kafka']}",
            request_partitions=2,
            render_partitions=4,
            partitions=2,
        ),
        cassandra=CassandraSettings(port=TEST_PORTS["cql"]),
        s3=S3Settings(endpoint_url=f"http://127.0.0.1:{TEST_PORTS['s3']}"),
        infra=InfraSettings(
            brokers=brokers,
            run_dir=run_dir / "run",
            lib_dir=REPO / "infra" / "lib",
            kafka_controller_port=TEST_PORTS["controller"],
            cassandra_storage_port=TEST_PORTS["storage"],
            prometheus_port=TEST_PORTS["prometheus"],
        ),
    )


@pytest.fixture(scope="session")
def prometheus(test_settings: Settings) -> Iterator[Settings]:
    """Settings whose Prometheus runs (started here, alone, unless external); it scrapes the file-SD
    targets in ``<home>/prometheus/targets``."""
    from infra.launcher import down, status, up

    if os.environ.get("AIGC_TEST_EXTERNAL") == "1":
        assert next(s for s in status(test_settings) if s.name == "prometheus").ready, "no Prometheus"
        yield test_settings
        return
    try:
        up(test_settings, attached=True, only=["prometheus"], echo=lambda line: print(f"[infra] {line}"))
        yield test_settings
    finally:
        down(test_settings, only=["prometheus"], echo=lambda line: print(f"[infra] {line}"))


@pytest.fixture(scope="session")
def infra(test_settings: Settings) -> Iterator[Settings]:
    """Settings pointing at running Kafka, Cassandra, S3Proxy and Prometheus (started unless external)."""
    from infra.bootstrap import bootstrap
    from infra.launcher import down, rss_mb, up

    settings = test_settings
    if os.environ.get("AIGC_TEST_EXTERNAL") == "1":
        bootstrap(settings, echo=lambda _: None)
        yield settings
        return
    started = time.monotonic()
    try:
        up(settings, attached=True, echo=lambda line: print(f"[infra] {line}"))
        _INFRA_REPORT.append(f"started and ready in {time.monotonic() - started:.1f} s")
        bootstrap(settings, echo=lambda _: None)
        yield settings
        _INFRA_REPORT.append(
            "resident memory at the end of the session: "
            + ", ".join(f"{k} {v:.0f} MiB" for k, v in rss_mb(settings).items())
        )
    finally:
        down(settings, echo=lambda line: print(f"[infra] {line}"))


@pytest.fixture(scope="session")
def kafka_cluster(request: pytest.FixtureRequest, pytestconfig: pytest.Config) -> Iterator[Settings]:
    """Settings of a running 3-broker Kafka cluster, next to the session's Cassandra, S3 server and
    Prometheus, that tests may SIGKILL brokers of (``infra.launcher.kill(settings, "kafka-<node.id>")``)
    and must restart (``up(settings, only=["kafka-<node.id>"])``) before they end. The session's own Kafka
    when it runs 3 brokers; otherwise a Kafka-only cluster started here in the session's run directory
    (nodes kafka-1..3), on CLUSTER_PORTS: below the ephemeral range, so that no client reconnecting to a
    killed broker is given its port."""
    from infra.launcher import down, kill, rss_mb, up

    base: Settings = request.getfixturevalue("infra")
    if session_brokers(pytestconfig) == 3:
        yield base
        return
    settings = Settings.load(
        home=base.home,
        kafka=base.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{CLUSTER_PORTS['kafka']}"}),
        cassandra=base.cassandra,
        s3=base.s3,
        # built anew (not copied), so that each node gets the cluster's heap (CLUSTER_KAFKA_HEAP_MB)
        infra=InfraSettings(
            **{
                **base.infra.model_dump(exclude_unset=True),
                "brokers": 3,
                "kafka_controller_port": CLUSTER_PORTS["controller"],
            }
        ),
    )
    try:
        started = time.monotonic()
        up(settings, attached=True, only=["kafka"], echo=lambda line: print(f"[cluster] {line}"))
        _INFRA_REPORT.append(
            f"3-broker cluster (kafka_cluster) ready in {time.monotonic() - started:.1f} s; resident memory "
            + ", ".join(f"{name} {mib:.0f} MiB" for name, mib in rss_mb(settings).items() if "kafka" in name)
        )
        yield settings
    finally:
        # Its data goes with the session's run directory, so the nodes are killed rather than shut down in
        # order: a controlled shutdown waits on a controller quorum that is leaving too (up to 30 s a node),
        # and `down(only=["kafka"])` would stop the session's own broker as well.
        nodes = [f"kafka-{node}" for node in range(1, 4)]
        for node in nodes:
            kill(settings, node, timeout_s=30.0)
        down(settings, only=nodes, echo=lambda line: print(f"[cluster] {line}"))


@pytest.fixture
def tmux(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A private tmux server: ``start(command, env)`` runs a command in a 160x60 pane; ``screen()``
    reads the pane."""
    if shutil.which("tmux") is None:
        pytest.fail("tmux is missing: `make setup` installs it")
    socket = str(tmp_path / "tmux.sock")
    session = unique("top")

    def start(command: str, env: dict[str, str]) -> None:
        subprocess.run(["tmux", "-S", socket, "new-session", "-d", "-s", session, "-x", "160", "-y", "60",
                        command], env=env, check=True, cwd=REPO)  # fmt: skip

    def screen() -> str:
        return subprocess.run(["tmux", "-S", socket, "capture-pane", "-p", "-t", session],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip

    yield start, screen
    subprocess.run(["tmux", "-S", socket, "kill-server"], capture_output=True, check=False)
