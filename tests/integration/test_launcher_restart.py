"""Restarting one service right after stopping it (what `aigc chaos` does to the broker)."""

from __future__ import annotations

from pathlib import Path

from infra.launcher import down, owned_pid, status, up
from infra.services import all_services
from plumbing.settings import InfraSettings, KafkaSettings, S3Settings, Settings
from tests.conftest import REPO


def test_a_service_restarts_at_once_after_it_was_stopped(tmp_path: Path):
    settings = Settings.load(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:39392"),
        s3=S3Settings(endpoint_url="http://127.0.0.1:39300"),
        infra=InfraSettings(
            run_dir=tmp_path / "run", lib_dir=REPO / "infra" / "lib", kafka_controller_port=39393
        ),
    )
    try:
        up(settings, attached=True, only=["s3proxy"], echo=lambda _: None)
        s3 = next(s for s in all_services(settings) if s.name == "s3proxy")
        first = owned_pid(s3)
        down(settings, only=["s3proxy"], echo=lambda _: None)
        up(settings, attached=True, only=["s3proxy"], echo=lambda _: None)  # no wait in between
        assert owned_pid(s3) not in (None, first)
        assert next(s for s in status(settings) if s.name == "s3proxy").ready
    finally:
        down(settings, echo=lambda _: None)
