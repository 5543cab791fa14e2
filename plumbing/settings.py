"""One typed, frozen settings object per process.

`Settings.load()` is called once at an entry point (the `aigc` CLI, a stage's main, a test fixture) and
the object is passed down; nothing below an entry point reads the environment. Every field can be set
from the environment with the prefix ``AIGC_`` and ``__`` between nested names, for example
``AIGC_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:9092`` or ``AIGC_MODELS='{"sd15": {"path": "/m/sd15"}}'``.
Secrets are ``SecretStr`` and print as ``**********``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "AIGC_"
ENV_NESTED_DELIMITER = "__"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Section):
    """How to reach Kafka and how the pipeline's topics are named and sized (``AIGC_KAFKA__*``)."""

    bootstrap_servers: str = Field("127.0.0.1:19092", description="Kafka bootstrap servers, comma separated")
    topic_prefix: str = Field("aigc", description="first dotted segment of every topic name")
    request_partitions: int = Field(6, ge=1, description="partitions of each request topic")
    render_partitions: int = Field(
        1,
        ge=1,
        description="partitions of each render topic: share-group renderers share a partition only while "
        "they outnumber the partitions, so 1 lets every renderer take every task; classic renderers need "
        "at least one partition each",
    )
    partitions: int = Field(6, ge=1, description="partitions of the other topics")
    replication_factor: int = Field(
        1,
        ge=1,
        description="replicas of each topic bootstrap creates (and faust's changelogs); unset, it follows "
        "infra.brokers (3 with the 3-broker cluster)",
    )
    min_insync_replicas: int | None = Field(
        None,
        ge=1,
        description="the topics' min.insync.replicas: replicas that must have an acks=all write before it "
        "is acknowledged; unset, replication_factor - 1 from a replication factor of 3 (2 of 3, so one "
        "broker may be down), else the broker's default (1)",
    )
    client_id: str = Field("aigc", description="client.id prefix for every Kafka client")
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None

    @property
    def topic_min_insync_replicas(self) -> int | None:
        """The min.insync.replicas bootstrap sets on every topic: the setting, else 2 from a replication
        factor of 3 (acks=all writes go on with one replica down), else None (the broker's default, 1)."""
        if self.min_insync_replicas is not None:
            return self.min_insync_replicas
        return 2 if self.replication_factor >= 3 else None

    def client_config(self) -> dict[str, str]:
        """librdkafka properties shared by every client (connection and security)."""
        conf = {"bootstrap.servers": self.bootstrap_servers, "security.protocol": self.security_protocol}
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username:
            conf["sasl.username"] = self.sasl_username
        if self.sasl_password:
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        return conf


class CassandraSettings(_Section):
    """How to reach Cassandra, the metadata store, and which keyspace to use (``AIGC_CASSANDRA__*``)."""

    hosts: tuple[str, ...] = ("127.0.0.1",)
    port: int = 19042
    keyspace: str = Field("aigc", pattern=r"^[a-z][a-z0-9_]{0,47}$")
    replication_factor: int = Field(1, ge=1)
    local_dc: str = "datacenter1"
    username: str | None = None
    password: SecretStr | None = None
    request_timeout_s: float = 10.0


class S3Settings(_Section):
    """How to reach the S3 object store and which buckets hold what (``AIGC_S3__*``)."""

    endpoint_url: str = "http://127.0.0.1:19000"
    region: str = "us-east-1"
    access_key_id: str = "aigc"
    secret_access_key: SecretStr = SecretStr("aigc-local-secret")
    staging_bucket: str = "aigc-staging"
    results_bucket: str = "aigc-results"
    presign_ttl_s: int = Field(3600, ge=1, le=7 * 24 * 3600)
    staging_ttl_days: int = Field(1, ge=1, description="lifecycle expiry of staged frames, where supported")


def _loopback_port(url: str) -> int:
    parsed = urlsplit(url if "://" in url else f"tcp://{url}")
    if parsed.port is None:
        raise ValueError(f"no port in {url!r}")
    return parsed.port


BROKER_PORT_STEP = 10  # node i of the 3-broker cluster: client and controller ports + (i - 1) * 10
CLUSTER_KAFKA_HEAP_MB = 768  # heap of each broker of the 3-broker cluster unless infra.kafka_heap_mb is set


class InfraSettings(_Section):
    """Where and how `aigc infra` runs the local services. Client ports come from the client settings."""

    brokers: int = Field(
        1,
        description="Kafka brokers `aigc infra up` runs: 1, or 3 (KRaft nodes 1..3, each broker and "
        "controller, services kafka-1..kafka-3; node i listens on the first bootstrap port + (i - 1) * 10 "
        "and kafka_controller_port + (i - 1) * 10). With 3 the bootstrap servers list all three and topics "
        "get replication factor 3 and min.insync.replicas 2 unless set",
    )
    run_dir: Path = Field(Path(".aigc/run"), description="data and logs of the local services")
    lib_dir: Path = Field(Path("infra/lib"), description="jars resolved by Maven")
    kafka_controller_port: int = 19093
    cassandra_storage_port: int = 17000
    # A broker that has run the suite holds thousands of partitions; 512 ran out. Each of 3 brokers gets
    # CLUSTER_KAFKA_HEAP_MB unless this is set.
    kafka_heap_mb: int = 1024
    cassandra_heap_mb: int = 768
    s3_heap_mb: int = 256
    prometheus_port: int = Field(19090, description="Prometheus's web UI and HTTP API on 127.0.0.1")
    prometheus_scrape_interval_s: float = Field(
        1.0, gt=0, le=60, description="how often Prometheus scrapes every stage (and evaluates the rules)"
    )
    prometheus_retention: str = Field("7d", pattern=r"^[0-9]+[smhdwy]$", description="how long samples stay")
    ready_timeout_s: float = 180.0

    @field_validator("brokers")
    @classmethod
    def _brokers(cls, brokers: int) -> int:
        if brokers not in (1, 3):
            raise ValueError(f"infra.brokers must be 1 or 3, not {brokers}")
        return brokers

    @model_validator(mode="before")
    @classmethod
    def _cluster_heap(cls, data: object) -> object:
        """Three brokers share the machine: each gets CLUSTER_KAFKA_HEAP_MB unless a heap is set."""
        if isinstance(data, dict) and str(data.get("brokers", 1)) == "3" and "kafka_heap_mb" not in data:
            return {**data, "kafka_heap_mb": CLUSTER_KAFKA_HEAP_MB}
        return data


class ModelSpec(_Section):
    """One model the renderers serve: where its weights are, which pool renders it and with which backend."""

    path: Path = Field(description="folder saved with save_pretrained (a diffusers pipeline)")
    pool: str = Field("default", pattern=r"^[a-z0-9]+(-[a-z0-9]+)*$", description="renderer pool serving it")
    backend: Literal["diffusers", "synthetic"] = "diffusers"
    max_batch: int = Field(8, ge=1, description="largest micro-batch of frames in one call")


class RequestLimits(_Section):
    """Bounds the validator enforces; the same object is used client-side and by the gatekeeper."""

    min_size: int = 64
    max_size: int = 1024
    size_multiple: int = 8
    max_steps: int = 150
    min_guidance: float = 0.0
    max_guidance: float = 30.0
    max_images: int = 8
    max_frames: int = 256
    min_fps: int = 1
    max_fps: int = 60
    max_prompt_chars: int = 4000
    max_labels: int = 32
    max_label_chars: int = 256
    max_deadline_ms: int = Field(7 * 24 * 3600 * 1000, description="furthest deadline from created_at")


class Tier(_Section):
    """Token-bucket limits of a tenant tier: requests and render cost (pixel-steps) per second."""

    requests_per_s: float = Field(20.0, gt=0)
    request_burst: float = Field(40.0, ge=1)
    cost_per_s: float = Field(20e6, gt=0, description="frames x steps x width x height per second")
    cost_burst: float = Field(200e6, gt=0)


MODERATION_CATEGORIES = (
    "sexual_minors",
    "sexual",
    "violence_gore",
    "hate",
    "self_harm",
    "weapons_drugs",
    "harassment_doxxing",
)


class GatekeeperSettings(_Section):
    """The gatekeeper's admission rules: dedupe, fan-out, moderation, tiers, rate limits
    (``AIGC_GATEKEEPER__*``)."""

    app_id: str = "aigc-gatekeeper"
    dedupe_window_s: float = Field(600.0, gt=0, description="a request_id seen within this window is dropped")
    frames_per_task: int = Field(4, ge=1, description="video frames per render task")
    tiers: dict[str, Tier] = Field(default_factory=lambda: {"standard": Tier()})
    tenant_tiers: dict[str, str] = Field(default_factory=dict, description="tenant -> tier name")
    default_tier: str = "standard"
    policy_path: Path | None = Field(None, description="moderation policy YAML (default: the shipped policy)")
    classifiers: tuple[str, ...] = Field((), description="'module:Class' moderation classifiers")
    classifier_threshold: float = 0.5
    prompt_model_path: Path | None = Field(
        None, description="prompt classifier .json (default: the shipped model); see prompt_model_enabled"
    )
    prompt_model_enabled: bool = Field(True, description="consult the prompt classifier after the policy")
    moderation_thresholds: dict[str, float] = Field(
        default_factory=lambda: dict.fromkeys(MODERATION_CATEGORIES, 0.8),
        description="category -> prompt-model score at or above which a prompt is blocked on the model alone",
    )
    moderation_cue_thresholds: dict[str, float] = Field(
        default_factory=lambda: dict.fromkeys(MODERATION_CATEGORIES, 0.4),
        description="category -> prompt-model score that blocks a prompt holding a cue of the category, "
        "or a framed match of its policy (prevention, news, ...)",
    )
    shed_backlog: dict[str, int] = Field(
        default_factory=lambda: {"LOW": 2000, "NORMAL": 20000},
        description="class -> render tasks waiting beyond which its new requests are shed (OVERLOADED)",
    )
    tenant_inflight_cap: dict[str, int] = Field(
        default_factory=lambda: {"NORMAL": 256, "LOW": 256},
        description="class -> render tasks one tenant may have unfinished; more is TENANT_BUSY (fairness)",
    )
    stream_buffer_maxsize: int = Field(256, ge=1)
    max_poll_records: int = Field(
        32,
        ge=1,
        description="requests one fetch hands the agents at most: a fetch larger than a class's free buffer "
        "blocks faust's delivery of every class until that class drains, HIGH included",
    )
    commit_interval_s: float = 1.0
    stall_timeout_s: float = Field(
        120.0, ge=10, description="a request partition left unread this long ends the process for a restart"
    )
    web_port: int | None = Field(None, description="faust's web server port; None disables it")

    @model_validator(mode="after")
    def _shed_classes(self) -> GatekeeperSettings:
        unknown = {*self.shed_backlog, *self.tenant_inflight_cap} - {"HIGH", "NORMAL", "LOW"}
        if unknown:
            raise ValueError(f"shed_backlog or tenant_inflight_cap names unknown class(es) {sorted(unknown)}")
        return self

    @model_validator(mode="after")
    def _moderation_thresholds(self) -> GatekeeperSettings:
        for name, value in {**self.moderation_thresholds, **self.moderation_cue_thresholds}.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"moderation threshold of {name}: {value} is not between 0 and 1")
        return self

    @model_validator(mode="after")
    def _tiers_exist(self) -> GatekeeperSettings:
        missing = {self.default_tier, *self.tenant_tiers.values()} - set(self.tiers)
        if missing:
            raise ValueError(f"tier(s) {', '.join(sorted(missing))} named but not defined in tiers")
        return self

    def tier_of(self, tenant_id: str) -> Tier:
        """The tier of ``tenant_id``: its entry in ``tenant_tiers``, else ``default_tier``."""
        return self.tiers[self.tenant_tiers.get(tenant_id, self.default_tier)]


class RendererSettings(_Section):
    """How renderers take, batch and render tasks (``AIGC_RENDERER__*``)."""

    weights: dict[str, float] = Field(
        default_factory=lambda: {"HIGH": 16.0, "NORMAL": 4.0, "LOW": 1.0},
        description="fair-share weights between classes (a busy LOW class keeps ~1/21 of frames)",
    )
    aging_s: float = Field(30.0, gt=0, description="a task waiting this long is served next")
    batch_wait_ms: float = Field(20.0, ge=0, description="how long NORMAL/LOW wait to fill a micro-batch")
    upload_workers: int = Field(8, ge=1)
    progress_interval_s: float = Field(
        0.5, gt=0, description="at most one RUNNING event per batch this often"
    )
    device: str | None = Field(None, description="cuda, cuda:1, cpu; default: cuda when present")
    shutdown_grace_s: float = Field(20.0, ge=0, description="on SIGTERM, how long a running batch may finish")
    max_poll_interval_ms: int = Field(
        300_000,
        ge=10_000,
        description="consumer max.poll.interval.ms (renders may last longer: polling goes on)",
    )
    cpu_threads: int = Field(
        1, ge=1, description="torch threads when rendering on CPU (1 leaves cores to Kafka and friends)"
    )
    worker_id: str | None = None
    consumer: Literal["share", "classic"] = Field(
        "share",
        description="share: each pool's renderers form one share group (KIP-932) and take tasks as a queue; "
        "classic: a consumer group that splits partitions (brokers without share groups)",
    )
    share_lock_ms: int = Field(
        60_000,
        ge=15_000,
        le=3_600_000,
        description="share mode: how long a taken task stays locked to its renderer (bootstrap sets the "
        "group's share.record.lock.duration.ms); must exceed the longest render, as the client cannot "
        "renew a lock; the broker caps it with group.share.max.record.lock.duration.ms (60 s by default)",
    )
    share_delivery_limit: int = Field(
        5,
        ge=2,
        le=10,
        description="share mode: deliveries of a task before it is dead-lettered (the group's "
        "share.delivery.count.limit); the last delivery is dead-lettered, not rendered",
    )
    share_fetch_wait_ms: dict[str, int] = Field(
        default_factory=lambda: {"HIGH": 10, "NORMAL": 50, "LOW": 250},
        description="share mode: class -> fetch.wait.max.ms of its share consumer, the latency of an idle "
        "queue; an idle consumer sends a fetch this often, so a short wait costs broker CPU all day",
    )
    synthetic_ms_per_frame: float = Field(200.0, ge=0, description="synthetic backend: device time per frame")
    synthetic_steps: int | None = Field(
        None, ge=1, description="synthetic backend: steps (default: the task's)"
    )

    @field_validator("weights")
    @classmethod
    def _all_classes(cls, weights: dict[str, float]) -> dict[str, float]:
        if set(weights) != {"HIGH", "NORMAL", "LOW"} or min(weights.values()) <= 0:
            raise ValueError("weights need positive HIGH, NORMAL and LOW entries")
        return weights


class AssemblerSettings(_Section):
    """The assembler sink's identity, limits and storage of results (``AIGC_ASSEMBLER__*``)."""

    instance: str = Field(
        "0", pattern=r"^[a-z0-9-]{1,32}$", description="stable id of this sink (transactional.id)"
    )
    batch_size: int = Field(200, ge=1, description="messages handled in one transaction at most")
    background_batch_size: int = Field(
        32,
        ge=1,
        description="messages of a class below HIGH handled in one transaction at most: more urgent work "
        "arriving meanwhile waits for that transaction",
    )
    poll_s: float = Field(0.1, gt=0, description="how long an idle sink waits for a message in one poll")
    workers: int = Field(8, ge=1, description="threads for object copies and frame downloads")
    concurrency: int = Field(16, ge=1, description="requests of one batch handled at the same time")
    transaction_timeout_ms: int = Field(15000, ge=1000)
    stall_timeout_s: float = Field(
        300.0,
        ge=5,
        description="a batch without progress this long ends the process (stacks logged) for a restart",
    )
    quarantine_bucket: str = Field(
        "aigc-quarantine", description="bucket of blocked outputs; operators only, never presigned"
    )


class OutputCheckSettings(_Section):
    """Output moderation: nudenet on every rendered frame, in the renderer that made it (before upload);
    the sink checks any frames that reach it unchecked, so nothing is published unchecked."""

    enabled: bool = Field(
        True, description="moderate every rendered image and video frame before publishing it"
    )
    unsafe_labels: dict[str, float] = Field(
        default_factory=lambda: dict.fromkeys(
            (
                "FEMALE_GENITALIA_EXPOSED",
                "MALE_GENITALIA_EXPOSED",
                "FEMALE_BREAST_EXPOSED",
                "BUTTOCKS_EXPOSED",
                "ANUS_EXPOSED",
            ),
            0.5,
        ),
        description="nudenet label -> score (0..1) from which a detection blocks the request's output",
    )
    threads: int = Field(1, ge=1, description="CPU threads of the detector in each process that runs it")

    @field_validator("unsafe_labels")
    @classmethod
    def _thresholds(cls, labels: dict[str, float]) -> dict[str, float]:
        wrong = sorted(label for label, score in labels.items() if not 0.0 <= score <= 1.0)
        if wrong:
            raise ValueError(f"output_check.unsafe_labels thresholds must be in [0, 1]: {wrong}")
        return labels


class RetrySettings(_Section):
    """Growing delays between attempts of retryable work; after the last, the work is dead-lettered."""

    delays_s: tuple[float, ...] = (1.0, 10.0, 60.0)
    max_attempts: int = Field(4, ge=1, description="attempts in all, the first included")


class WebhookSettings(_Section):
    """Webhook delivery (stream_processors/webhooks): Completions POSTed, signed, to each request's or
    tenant's URL; retries follow ``retry`` (the shared retry topics and relay)."""

    enabled: bool = Field(
        True,
        description="run the webhook delivery stage under `aigc run` / `aigc up` / `aigc demo` "
        "(running_pipeline starts it only when asked: webhooks=True)",
    )
    allow_hosts: tuple[str, ...] = Field(
        (),
        description="hosts, addresses or networks (CIDR) a webhook may reach although they are loopback, "
        "private, link-local or otherwise not global, e.g. '[\"127.0.0.1\"]'; everything else non-global "
        "is refused (SSRF protection)",
    )
    timeout_s: float = Field(10.0, gt=0, le=60, description="connect and response timeout of one POST")


class GatewaySettings(_Section):
    """The HTTP gateway (producers/gateway): the front door for HTTP clients and the web console."""

    enabled: bool = Field(
        True,
        description="`aigc run`, `aigc up` and `aigc demo` start the gateway stage; `running_pipeline` "
        "starts it only when its caller asks (gateway=True)",
    )
    host: str = Field("127.0.0.1", description="address the HTTP API and console listen on")
    port: int = Field(19080, ge=0, le=65535, description="port of the HTTP API and the console")
    public_url: str | None = Field(
        None, description="base URL clients reach the gateway at (Location headers); default http://host:port"
    )
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="largest request body; more is 413")
    rate_per_s: float = Field(50.0, gt=0, description="submissions per second per API key (token bucket)")
    rate_burst: float = Field(100.0, ge=1, description="burst of submissions per API key")
    key_cache_s: float = Field(
        5.0,
        ge=0,
        description="how long a looked-up API key is trusted before Cassandra is asked again "
        "(a revoked key stops working within this)",
    )
    sse_keepalive_s: float = Field(15.0, gt=0, description="comment line sent on an idle event stream")
    max_streams: int = Field(64, ge=1, description="event streams open at once; more are answered 503")
    page_size: int = Field(20, ge=1, le=200, description="default page of GET /v1/generations")
    linger_ms: float = Field(
        1.0,
        ge=0,
        le=100,
        description="how long the gateway's batching producer waits to fill a batch (librdkafka linger.ms); "
        "it takes the submissions that find others in flight, so a lone one never waits; 0: one producer",
    )


class ObservabilitySettings(_Section):
    """Metrics, health endpoints and lag (plumbing/observability.py); spans (plumbing/tracing.py)."""

    metrics: bool = Field(
        True, description="record stage metrics; false makes every metric call a no-op (to measure the cost)"
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="address the /metrics, /healthz and /readyz server binds (0.0.0.0 in containers)",
    )
    lag_interval_s: float = Field(5.0, gt=0, description="lag exporter: how often it asks the broker")
    bucket_top_n: int = Field(
        20, ge=0, description="gatekeeper: tenants with the emptiest token buckets exported as gauges"
    )
    otlp_endpoint: str | None = Field(
        None,
        description="OpenTelemetry collector (OTLP/HTTP base URL, e.g. http://127.0.0.1:4318) that every "
        "stage sends its spans to; unset: the standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
        "OTEL_EXPORTER_OTLP_ENDPOINT; none of them: no spans are recorded",
    )


class Settings(BaseSettings):
    """Every setting of the pipeline, read once at the entry point from ``AIGC_*`` variables (nested sections
    with ``__``) over the defaults, then passed down; frozen.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        frozen=True,
        extra="ignore",
    )

    home: Path = Field(Path(".aigc"), description="working folder for models, outputs and state")
    instance: str | None = Field(
        None,
        pattern=r"^[a-z0-9-]{1,48}$",
        description="stable id of this process within its stage: static group membership, so a restarted "
        "process takes its partitions back at once (`aigc run` sets one per process; leave it unset where "
        "replicas share one environment)",
    )
    kafka: KafkaSettings = KafkaSettings()
    cassandra: CassandraSettings = CassandraSettings()
    s3: S3Settings = S3Settings()
    infra: InfraSettings = InfraSettings()
    limits: RequestLimits = RequestLimits()
    retry: RetrySettings = RetrySettings()
    gatekeeper: GatekeeperSettings = GatekeeperSettings()
    renderer: RendererSettings = RendererSettings()
    assembler: AssemblerSettings = AssemblerSettings()
    output_check: OutputCheckSettings = OutputCheckSettings()
    webhooks: WebhookSettings = WebhookSettings()
    gateway: GatewaySettings = GatewaySettings()
    models: dict[str, ModelSpec] = Field(
        default_factory=lambda: {"tiny-sd": ModelSpec(path=Path(".aigc/models/tiny-sd"))},
        description="model name -> local folder and renderer pool",
    )
    reply_topic_prefixes: dict[str, str] = Field(
        default_factory=dict,
        description="tenant -> allowed reply topic prefix (default <prefix>.reply.<tenant>)",
    )
    observability: ObservabilitySettings = ObservabilitySettings()
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="port of this process's /metrics, /healthz and /readyz (the supervisor sets one per "
        "process; unset: no server)",
    )
    log_level: str = "INFO"
    call_counts_dir: Path | None = Field(
        None,
        description="benchmark ledger: each process writes its Kafka requests (librdkafka statistics), CQL "
        "statements and S3 calls to <dir>/<pid>.json (plumbing/call_counts.py); unset, nothing is counted",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="text: one readable line per record; json: one JSON object per line"
    )

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        for name in models:
            if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
                raise ValueError(f"model name {name!r} must be 1-64 of [A-Za-z0-9._-]")
        return models

    @model_validator(mode="after")
    def _cluster(self) -> Settings:
        """With ``infra.brokers`` 3, a single bootstrap address stands for the cluster's first node: list
        all three (node i at its port + (i - 1) * BROKER_PORT_STEP), so a client starts while any one
        is down; an unset replication factor follows the broker count."""
        brokers = self.infra.brokers
        if brokers == 1:
            return self
        update: dict[str, object] = {}
        servers = [s.strip() for s in self.kafka.bootstrap_servers.split(",") if s.strip()]
        if len(servers) == 1:
            host, _, port = servers[0].rpartition(":")
            update["bootstrap_servers"] = ",".join(
                f"{host}:{int(port) + i * BROKER_PORT_STEP}" for i in range(brokers)
            )
        if "replication_factor" not in self.kafka.model_fields_set:
            update["replication_factor"] = brokers
        if update:
            # The object is frozen; this runs while it is being built, before anyone holds it.
            object.__setattr__(self, "kafka", self.kafka.model_copy(update=update))
        return self

    @classmethod
    def load(cls, **overrides: object) -> Settings:
        """Read the environment once; keyword overrides win (used by tests and CLI flags)."""
        return cls(**overrides)  # type: ignore[arg-type]

    def for_brokers(self, brokers: int | None) -> Settings:
        """These settings for ``brokers`` Kafka brokers (None: as they are), read again with that count so
        that the bootstrap servers and the replication factor follow it (a command's ``--brokers``)."""
        if brokers is None or brokers == self.infra.brokers:
            return self
        return Settings.load(infra={"brokers": brokers})

    @property
    def pools(self) -> tuple[str, ...]:
        """The renderer pools the models name, sorted."""
        return tuple(sorted({spec.pool for spec in self.models.values()}))

    @property
    def kafka_port(self) -> int:
        """The port of the first bootstrap server, which must be on loopback (for the local launcher)."""
        return _loopback_port(self.kafka.bootstrap_servers.split(",")[0])

    @property
    def kafka_ports(self) -> tuple[int, ...]:
        """The ports of every bootstrap server, in order, which must be on loopback (for the local
        launcher: node i of the 3-broker cluster listens on the i-th)."""
        return tuple(_loopback_port(server.strip()) for server in self.kafka.bootstrap_servers.split(","))

    @property
    def s3_port(self) -> int:
        """The port of the S3 endpoint, which must be on loopback (for the local launcher)."""
        return _loopback_port(self.s3.endpoint_url)

    def to_env(self) -> dict[str, str]:
        """Environment variables that rebuild these settings in a child process (secrets included)."""

        def reveal(value: object) -> object:
            if isinstance(value, SecretStr):
                return value.get_secret_value()
            if isinstance(value, BaseModel):
                return {k: reveal(v) for k, v in value.__dict__.items()}
            if isinstance(value, dict):
                return {k: reveal(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [reveal(v) for v in value]
            if isinstance(value, Path):
                return str(value)
            return value

        env = {}
        for name in type(self).model_fields:
            value = reveal(getattr(self, name))
            if value is None:
                continue  # unset: the child's default is None too
            # pydantic-settings parses complex fields as JSON and takes simple ones verbatim.
            env[f"{ENV_PREFIX}{name.upper()}"] = (
                json.dumps(value) if isinstance(value, dict | list) else str(value)
            )
        return env

    def redacted(self) -> str:
        """The settings as JSON with secrets masked, for logs and `aigc config`."""
        return self.model_dump_json(indent=2)
