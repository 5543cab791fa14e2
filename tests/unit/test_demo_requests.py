"""The demo asks the trained shapes model for valid requests, and only when the registry was left alone."""

from __future__ import annotations

from pathlib import Path

from plumbing.settings import ModelSpec, Settings
from plumbing.validation import validate_request
from producers.demo import DEMO_MODEL, demo_requests, demo_settings
from schemas.codec import Codec


def test_the_demo_uses_the_shapes_model_unless_the_registry_names_others() -> None:
    default = Settings.load(models=Settings.model_fields["models"].default_factory())  # type: ignore[misc]
    assert list(demo_settings(default).models) == [DEMO_MODEL]
    assert demo_settings(default).models[DEMO_MODEL].path == default.home / "models" / DEMO_MODEL
    custom = Settings.load(models={"sd15": ModelSpec(path=Path("/models/sd15"))})
    assert demo_settings(custom) is custom


def test_every_demo_request_is_valid_and_encodes() -> None:
    settings = demo_settings(Settings.load())
    codec = Codec()
    requests = demo_requests(DEMO_MODEL)
    for record in requests:
        validate_request(record, settings.limits, set(settings.models), lambda t: f"aigc.reply.{t}")
        codec.encode("GenerationRequest", record.to_avro())
    video = next(r for r in requests if r.video)
    assert video.video is not None and video.video.seed_end == video.seed  # one noise: only the prompt walks
