"""docker-compose.yml stays in step with the code it runs.

The compose file repeats facts that live in the code: setting names (plumbing/settings.py), CLI verbs
(aigc/cli.py), the local launcher's broker, Cassandra and S3Proxy settings (infra/services.py) and the
model path the init job builds; its brokers are the launcher's 3-broker cluster (kafka-1..kafka-3). Each
test here reads the compose file with PyYAML and compares one of those facts with the code, so renaming a
setting or a verb, or changing a launcher setting, fails here until the compose file follows. No Docker
engine is needed; the last test also runs ``docker compose config`` when the CLI is installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any, get_origin
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import BaseModel

from aigc.cli import build_parser
from infra.services import Cassandra, Kafka, S3Proxy, all_services
from plumbing.settings import (
    CLUSTER_KAFKA_HEAP_MB,
    ENV_NESTED_DELIMITER,
    ENV_PREFIX,
    CassandraSettings,
    KafkaSettings,
    S3Settings,
    Settings,
)
from plumbing.supervisor import pipeline_stages

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"

# The verbs the pipeline needs from its containers: the init job's two steps and every stage that `aigc run`
# supervises (read from the supervisor, so a new stage fails here until compose runs it too).
REQUIRED_INVOCATIONS = {("infra", "bootstrap"), ("models", "build-tiny")} | {
    (spec.verb[0],) for spec in pipeline_stages(Settings(), renderers=1)
}
# Broker settings that name addresses and folders, so differ between loopback processes and containers.
KAFKA_ADDRESS_KEYS = {
    "listeners",
    "advertised.listeners",
    "listener.security.protocol.map",
    "controller.quorum.voters",
    "log.dirs",
}
# S3Proxy settings that differ on purpose: addresses, and a Jetty tuning knob the image's start script
# (run-docker-container.sh) has no variable for.
S3PROXY_UNMIRRORED_KEYS = {"s3proxy.endpoint", "jclouds.filesystem.basedir", "s3proxy.jetty.max-threads"}
CASSANDRA_OVERRIDE = re.compile(r"-Dcassandra\.settings\.([a-z0-9_]+)=(\S+)")
# The brokers: compose runs the local launcher's 3-broker cluster, node i as service kafka-<i>.
KAFKA_NODES = {node_id: f"kafka-{node_id}" for node_id in (1, 2, 3)}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings in these tests come from the compose file only, never from the caller's environment."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    assert isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def pipeline_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Services that run the pipeline image: the one(s) building it and those using the built tag."""
    built = {svc["image"] for svc in services.values() if "build" in svc and "image" in svc}
    assert built, "no service builds the pipeline image (a service with both build: and image:)"
    return {name: svc for name, svc in services.items() if svc.get("image") in built}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def as_argv(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def aigc_invocations(name: str, service: dict[str, Any]) -> list[list[str]]:
    """The argument lists each ``aigc`` run of a service gets (without the program name)."""
    entrypoint = as_argv(service.get("entrypoint"))
    command = as_argv(service.get("command"))
    if not entrypoint or entrypoint == ["aigc"]:  # the image's ENTRYPOINT is aigc (checked below)
        return [command]
    if entrypoint[-1] == "-c" and Path(entrypoint[0]).name in {"sh", "bash"}:
        assert len(command) == 1, f"{name}: a shell entrypoint takes one script, got {command}"
        runs = []
        for part in command[0].split("&&"):
            argv = shlex.split(part)
            assert argv and argv[0] == "aigc", f"{name}: {part.strip()!r} does not run aigc"
            runs.append(argv[1:])
        return runs
    pytest.fail(f"{name}: entrypoint {entrypoint} is neither the image's aigc nor sh -c")


def parse_verbs(name: str, argv: list[str]) -> Any:
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{name}: `aigc {shlex.join(argv)}` is not a valid aigc command line")


def settings_path(env_name: str) -> str | None:
    """Why ``env_name`` is not a Settings field (None when it is): AIGC_A__B is settings.a.b."""
    parts = env_name[len(ENV_PREFIX) :].lower().split(ENV_NESTED_DELIMITER)
    model: type[BaseModel] = Settings
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return f"{model.__name__} has no field {part!r}"
        annotation = field.annotation
        if i == len(parts) - 1:
            return None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif get_origin(annotation) is dict:
            return None  # the remaining parts are keys of a mapping setting (e.g. GATEKEEPER__TIERS__gold)
        else:
            return f"{model.__name__}.{part} is a {annotation}, not a section with field {parts[i + 1]!r}"
    return None


def settings_from(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in environment(service).items():
        if key.upper().startswith(ENV_PREFIX):
            monkeypatch.setenv(key, value)
    return Settings.load()


def read_properties(path: Path) -> dict[str, str]:
    props = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props


def kafka_image_property(env_name: str) -> str:
    """The server.properties key the apache/kafka image writes for KAFKA_<NAME> (its utility ConvertKey)."""
    key = env_name.removeprefix("KAFKA_")
    key = re.sub(r"[^_]_[^_]", lambda m: m.group(0).replace("_", "."), key)
    return key.replace("___", "-").replace("__", "_").lower()


def published(service: dict[str, Any], container_port: int) -> tuple[str, int]:
    """(host address, host port) a service publishes its container port on."""
    for entry in service.get("ports", []):
        parts = str(entry).split(":")
        if int(parts[-1]) == container_port:
            host = parts[0] if len(parts) == 3 else "0.0.0.0"
            return host, int(parts[-2])
    pytest.fail(f"container port {container_port} is not published")


def mount_source(volume: str | dict[str, Any]) -> str:
    return str(volume["source"]) if isinstance(volume, dict) else volume.split(":")[0]


def mount_target(volume: str | dict[str, Any]) -> PurePosixPath:
    return PurePosixPath(volume["target"] if isinstance(volume, dict) else volume.split(":")[1])


def local_settings(tmp_path: Path, brokers: int = 1) -> Settings:
    return Settings.load(infra={"run_dir": tmp_path / "run", "brokers": brokers})


def broker_config(service: dict[str, Any]) -> dict[str, str]:
    """The server.properties the apache/kafka image writes for a compose Kafka service."""
    return {kafka_image_property(k): v for k, v in environment(service).items() if k.startswith("KAFKA_")}


def test_aigc_environment_variables_are_settings_fields(services: dict[str, dict[str, Any]]):
    seen = set()
    for name, service in services.items():
        for key in environment(service):
            if key.upper().startswith(ENV_PREFIX):
                seen.add(key)
                problem = settings_path(key)
                assert problem is None, f"{name}: {key} is not a setting: {problem}"
    # The walk above only means something if the file sets the connection settings at all.
    assert {
        "AIGC_KAFKA__BOOTSTRAP_SERVERS",
        "AIGC_CASSANDRA__HOSTS",
        "AIGC_S3__ENDPOINT_URL",
        "AIGC_MODELS",
    } <= seen


def test_settings_field_lookup_rejects_unknown_names():
    assert settings_path("AIGC_KAFKA__BOOTSTRAP_SERVERS") is None
    assert settings_path("AIGC_GATEKEEPER__TIERS__gold__requests_per_s") is None
    assert settings_path("AIGC_KAFKA__BOOTSTRAP_SERVER") is not None
    assert settings_path("AIGC_KAFKA_BOOTSTRAP_SERVERS") is not None
    assert settings_path("AIGC_LOG_LEVEL__X") is not None


def test_every_pipeline_service_loads_valid_settings(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
):
    for name, service in pipeline_services(services).items():
        with monkeypatch.context() as m:
            settings = settings_from(service, m)
        hosts = [server.rpartition(":")[0] for server in settings.kafka.bootstrap_servers.split(",")]
        assert hosts == list(KAFKA_NODES.values()), f"{name}: Kafka hosts {hosts} are not the brokers"
        assert settings.infra.brokers == len(KAFKA_NODES), name
        assert settings.kafka.replication_factor == len(KAFKA_NODES), name
        assert settings.kafka.topic_min_insync_replicas == 2, name
        assert all(h in services for h in settings.cassandra.hosts), f"{name}: {settings.cassandra.hosts}"
        assert urlsplit(settings.s3.endpoint_url).hostname in services, name


def test_services_run_existing_cli_verbs(services: dict[str, dict[str, Any]]):
    run = set()
    for name, service in pipeline_services(services).items():
        for argv in aigc_invocations(name, service):
            args = parse_verbs(name, argv)
            sub = next((getattr(args, a) for a in ("infra_verb", "models_verb") if hasattr(args, a)), None)
            run.add((args.verb, sub) if sub else (args.verb,))
    assert run >= REQUIRED_INVOCATIONS, f"stages without a service: {REQUIRED_INVOCATIONS - run}"


def test_image_entrypoint_is_the_aigc_command():
    entrypoints = [
        line.split(None, 1)[1]
        for line in DOCKERFILE.read_text(encoding="utf-8").splitlines()
        if line.startswith("ENTRYPOINT")
    ]
    assert entrypoints, "Dockerfile has no ENTRYPOINT"
    assert json.loads(entrypoints[-1]) == ["aigc"]
    scripts = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^aigc = "aigc\.cli:main"$', scripts, re.MULTILINE)


def test_startup_order(services: dict[str, dict[str, Any]]):
    stages = pipeline_services(services)
    inits = [n for n, s in stages.items() if "build" in s]
    assert len(inits) == 1
    init = services[inits[0]]
    assert str(init.get("restart", "no")) == "no"
    for infra in (*KAFKA_NODES.values(), "cassandra", "s3"):
        assert init["depends_on"][infra]["condition"] == "service_healthy", infra
        assert services[infra].get("healthcheck", {}).get("test"), f"{infra} has no healthcheck"
    for name, service in stages.items():
        if name != inits[0]:
            condition = service.get("depends_on", {}).get(inits[0], {}).get("condition")
            assert condition == "service_completed_successfully", name


def test_kafka_brokers_match_the_local_launcher(services: dict[str, dict[str, Any]], tmp_path: Path):
    settings = local_settings(tmp_path, brokers=3)
    assert {s.name for s in all_services(settings)} >= set(KAFKA_NODES.values())
    for node_id, name in KAFKA_NODES.items():
        kafka = Kafka(settings, node_id)
        assert kafka.name == name
        kafka.prepare()
        launcher = read_properties(kafka.properties_file)
        image = broker_config(services[name])
        for key in (
            "auto.create.topics.enable",
            "group.initial.rebalance.delay.ms",
            "offsets.topic.replication.factor",
            "transaction.state.log.replication.factor",
            "transaction.state.log.min.isr",
            "min.insync.replicas",
            "node.id",
        ):
            assert key in launcher, f"the launcher no longer sets {key}; revisit this test"
        for key, value in launcher.items():
            if key in KAFKA_ADDRESS_KEYS:
                continue
            assert key in image, f"compose {name} lacks {key}={value} (KAFKA_{key.upper().replace('.', '_')})"
            assert image[key] == value, f"{name} {key}: compose {image[key]!r}, launcher {value!r}"
        heap = environment(services[name])["KAFKA_HEAP_OPTS"].split()
        assert f"-Xmx{settings.infra.kafka_heap_mb}m" in heap, name
    assert settings.infra.kafka_heap_mb == CLUSTER_KAFKA_HEAP_MB
    # Every node is formatted with one cluster id.
    assert len({environment(services[name])["CLUSTER_ID"] for name in KAFKA_NODES.values()}) == 1


def test_kafka_listeners_fit_the_clients(services: dict[str, dict[str, Any]]):
    inter_broker = []
    voters = []
    for node_id, name in KAFKA_NODES.items():
        kafka = broker_config(services[name])
        names = {entry.split(":", 1)[0] for entry in kafka["listener.security.protocol.map"].split(",")}
        listeners = {entry.split("://")[0] for entry in kafka["listeners"].split(",")}
        advertised = dict(entry.split("://") for entry in kafka["advertised.listeners"].split(","))
        assert listeners <= names
        assert kafka["controller.listener.names"] in listeners
        assert set(advertised) <= listeners - {kafka["controller.listener.names"]}
        assert kafka["node.id"] == str(node_id)
        inter_broker.append(advertised[kafka["inter.broker.listener.name"]])
        assert inter_broker[-1].rpartition(":")[0] == name
        controller_port = next(
            e.rsplit(":", 1)[1] for e in kafka["listeners"].split(",") if e.startswith("CONTROLLER://")
        )
        voters.append(f"{node_id}@{name}:{controller_port}")
    # Every node names the same voters: each node's controller listener.
    for name in KAFKA_NODES.values():
        assert broker_config(services[name])["controller.quorum.voters"] == ",".join(voters), name
    # The pipeline containers bootstrap from every broker's inter-broker listener.
    for name, service in pipeline_services(services).items():
        bootstrap = environment(service)["AIGC_KAFKA__BOOTSTRAP_SERVERS"]
        assert bootstrap == ",".join(inter_broker), name


def test_host_ports_are_the_local_defaults(services: dict[str, dict[str, Any]], tmp_path: Path):
    """The README promises that the host CLI reaches the containers with no AIGC_* variables set; with
    AIGC_INFRA__BROKERS=3 it lists the three brokers at the ports `aigc infra up --brokers 3` uses."""
    default_bootstrap = KafkaSettings().bootstrap_servers
    cluster = local_settings(tmp_path, brokers=3)
    assert cluster.kafka.bootstrap_servers.split(",")[0] == default_bootstrap
    for (node_id, name), port in zip(KAFKA_NODES.items(), cluster.kafka_ports, strict=True):
        kafka = broker_config(services[name])
        host_listeners = [
            e.split("://")[1] for e in kafka["advertised.listeners"].split(",") if e.endswith(f":{port}")
        ]
        assert host_listeners == [f"127.0.0.1:{port}"], name
        assert published(services[name], port) == ("127.0.0.1", port), name
        assert Kafka(cluster, node_id).ports[0] == port
    cql_port = int(environment(services["init"])["AIGC_CASSANDRA__PORT"])
    assert published(services["cassandra"], cql_port) == ("127.0.0.1", CassandraSettings().port)
    s3_port = urlsplit(environment(services["init"])["AIGC_S3__ENDPOINT_URL"]).port
    assert s3_port is not None
    assert published(services["s3"], s3_port) == ("127.0.0.1", urlsplit(S3Settings().endpoint_url).port)


def test_cassandra_matches_the_local_launcher(services: dict[str, dict[str, Any]], tmp_path: Path):
    cassandra = Cassandra(local_settings(tmp_path))
    cassandra.prepare()
    launcher = yaml.safe_load((cassandra.dir / "cassandra.yaml").read_text(encoding="utf-8"))
    env = environment(services["cassandra"])
    assert env["CASSANDRA_CLUSTER_NAME"] == launcher["cluster_name"]
    assert env["CASSANDRA_ENDPOINT_SNITCH"] == launcher["endpoint_snitch"]
    opts = env.get("JVM_EXTRA_OPTS", "")
    overrides = dict(CASSANDRA_OVERRIDE.findall(opts))
    # Cassandra 5.0 ignores -Dcassandra.settings.* silently unless this is on.
    assert "-Dcassandra.config.allow_system_properties=true" in opts.split()
    # The assembler's terminal write is a Paxos LWT; the launcher runs Paxos v2.
    assert "paxos_variant" in overrides
    for key, value in overrides.items():
        assert key in launcher, f"the launcher's cassandra.yaml does not set {key}"
        assert str(launcher[key]).lower() == value.lower(), (
            f"{key}: compose {value}, launcher {launcher[key]}"
        )
    # MAX_HEAP_SIZE and HEAP_NEWSIZE go together in cassandra-env.sh.
    assert ("MAX_HEAP_SIZE" in env) == ("HEAP_NEWSIZE" in env)


def test_s3proxy_matches_the_local_launcher(services: dict[str, dict[str, Any]], tmp_path: Path):
    s3proxy = S3Proxy(local_settings(tmp_path))
    s3proxy.prepare()
    launcher = read_properties(s3proxy.dir / "s3proxy.properties")
    env = environment(services["s3"])
    assert "s3proxy.authorization" in launcher
    for key, value in launcher.items():
        if key in S3PROXY_UNMIRRORED_KEYS:
            continue
        var = re.sub(r"[.-]", "_", key).upper()
        assert env.get(var) == value, f"compose s3 {var}={env.get(var)!r}, launcher {key}={value}"
    endpoint = urlsplit(env["S3PROXY_ENDPOINT"])
    for name, service in pipeline_services(services).items():
        client = urlsplit(environment(service)["AIGC_S3__ENDPOINT_URL"])
        assert (client.hostname, client.port) == ("s3", endpoint.port), name


def test_renderers_load_the_model_the_init_job_builds(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
):
    stages = pipeline_services(services)
    builds = [
        (name, parse_verbs(name, argv))
        for name, service in stages.items()
        for argv in aigc_invocations(name, service)
        if argv[:2] == ["models", "build-tiny"]
    ]
    assert len(builds) == 1
    builder, build = builds[0]
    built = PurePosixPath(build.dir)
    builder_mounts = [
        v for v in services[builder].get("volumes", []) if built.is_relative_to(mount_target(v))
    ]
    assert builder_mounts, f"{builder} builds {built} outside its volumes"
    volume = mount_source(builder_mounts[0])
    assert volume in (compose.get("volumes") or {}), (
        f"{builder} writes the model to {volume!r}, not a named volume"
    )

    renderers = {
        name: args
        for name, service in stages.items()
        for argv in aigc_invocations(name, service)
        if (args := parse_verbs(name, argv)).verb == "render"
    }
    assert renderers
    with monkeypatch.context() as m:
        gatekeeper_models = settings_from(stages["gatekeeper"], m).models
    for name, args in renderers.items():
        with monkeypatch.context() as m:
            settings = settings_from(stages[name], m)
        served = {PurePosixPath(spec.path) for spec in settings.models.values() if spec.pool == args.pool}
        assert built in served, f"{name} (pool {args.pool}) serves {served}, init builds {built}"
        assert settings.models == gatekeeper_models, f"{name} and the gatekeeper disagree on AIGC_MODELS"
        same_mount = [
            v
            for v in stages[name].get("volumes", [])
            if mount_source(v) == volume and mount_target(v) == mount_target(builder_mounts[0])
        ]
        assert same_mount, f"{name} does not mount volume {volume!r} where {builder} writes it"


def _docker_compose_available() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@pytest.mark.skipif(
    not _docker_compose_available(),
    reason="needs the docker CLI with the compose plugin (no engine): run "
    "`docker compose -f docker-compose.yml config -q` (and with `--profile gpu`) where it is installed",
)
@pytest.mark.parametrize("profiles", [[], ["--profile", "gpu"]], ids=["default", "gpu"])
def test_docker_compose_accepts_the_file(profiles: list[str]):
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), *profiles, "config", "-q"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_compose_prometheus_scrapes_every_stage_service_on_its_metrics_port(
    services: dict[str, dict[str, Any]],
):
    config = yaml.safe_load(
        (REPO / "infra" / "prometheus" / "prometheus.compose.yml").read_text(encoding="utf-8")
    )
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "aigc"]
    (discovery,) = job["dns_sd_configs"]
    stages = {
        name
        for name, service in pipeline_services(services).items()
        if "healthcheck" in service and aigc_invocations(name, service) != [[]]
    }
    assert stages and stages <= set(discovery["names"]), stages - set(discovery["names"])
    ports = {environment(services[name]).get("AIGC_METRICS_PORT") for name in stages}
    assert ports == {str(discovery["port"])}
