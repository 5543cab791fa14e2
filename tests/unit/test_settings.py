"""Settings: one frozen object from the environment, secrets hidden when printed."""

from __future__ import annotations

import pydantic
import pytest

from plumbing.settings import Settings


def test_environment_sets_nested_fields(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AIGC_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:39092")
    monkeypatch.setenv("AIGC_S3__PRESIGN_TTL_S", "60")
    monkeypatch.setenv("AIGC_MODELS", '{"sd15": {"path": "/models/sd15", "pool": "big-gpu"}}')
    settings = Settings.load()
    assert settings.kafka.bootstrap_servers == "127.0.0.1:39092"
    assert settings.kafka_port == 39092
    assert settings.s3.presign_ttl_s == 60
    assert settings.pools == ("big-gpu",)


def test_settings_are_frozen():
    settings = Settings.load()
    with pytest.raises(pydantic.ValidationError):
        settings.log_level = "DEBUG"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        settings.kafka.topic_prefix = "x"  # type: ignore[misc]


def test_secrets_are_hidden_when_printed(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AIGC_S3__SECRET_ACCESS_KEY", "hunter2-very-secret")
    monkeypatch.setenv("AIGC_KAFKA__SASL_PASSWORD", "kafka-secret-pw")
    settings = Settings.load()
    for text in (settings.redacted(), repr(settings), str(settings)):
        assert "hunter2-very-secret" not in text
        assert "kafka-secret-pw" not in text
    assert settings.s3.secret_access_key.get_secret_value() == "hunter2-very-secret"
    assert settings.kafka.client_config()["sasl.password"] == "kafka-secret-pw"


def test_bad_values_are_rejected_with_the_field_named(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AIGC_KAFKA__REQUEST_PARTITIONS", "0")
    with pytest.raises(pydantic.ValidationError, match="request_partitions"):
        Settings.load()


def test_model_names_and_pools_are_checked():
    with pytest.raises(pydantic.ValidationError, match="pool"):
        Settings.load(models={"m": {"path": "/m", "pool": "Has Spaces"}})
    with pytest.raises(pydantic.ValidationError, match="model name"):
        Settings.load(models={"../m": {"path": "/m"}})


def test_to_env_rebuilds_the_same_settings_in_a_child(monkeypatch: pytest.MonkeyPatch):
    from plumbing.settings import GatekeeperSettings, KafkaSettings, Tier

    original = Settings.load(
        instance=None,
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1", sasl_password=pydantic.SecretStr("pw")),
        gatekeeper=GatekeeperSettings(tiers={"standard": Tier(), "tiny": Tier(request_burst=1)}),
    )
    for key in list(__import__("os").environ):
        if key.startswith("AIGC_"):
            monkeypatch.delenv(key)
    for key, value in original.to_env().items():
        monkeypatch.setenv(key, value)
    rebuilt = Settings.load()
    assert rebuilt == original
    assert rebuilt.kafka.sasl_password.get_secret_value() == "pw"
