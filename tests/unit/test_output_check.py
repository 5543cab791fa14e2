"""Output moderation's decision rule and the verdict's round trip through the Cassandra row, on pure data.

The real detector on real pixels is covered by tests/integration/test_output_check.py, the whole path
(quarantine, terminal row, Completion) by tests/e2e/test_output_moderation.py.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError

from plumbing.errors import ErrorKind, PermanentError, classify
from plumbing.output_check import Detection, OutputVerdict, decide, from_record, policy_version
from plumbing.settings import OutputCheckSettings
from schemas.codec import default_codec
from schemas.records import ModerationVerdict, OutputCheckResult
from stream_processors.assembler.assembly import Assembler, completion_from_row
from stream_processors.assembler.store import FrameRow, moderation_row, moderation_verdict
from stream_processors.assembler.video import encode_image

UNSAFE = {"BUTTOCKS_EXPOSED": 0.5, "ANUS_EXPOSED": 0.3}


def test_nothing_detected_is_clean() -> None:
    assert decide([[], []], UNSAFE) is None
    assert decide([], UNSAFE) is None


def test_safe_labels_never_block_however_high() -> None:
    frames = [[Detection("FACE_FEMALE", 0.99), Detection("FEET_EXPOSED", 0.97)]]
    assert decide(frames, UNSAFE) is None


def test_an_unsafe_label_blocks_from_its_own_threshold() -> None:
    assert decide([[Detection("BUTTOCKS_EXPOSED", 0.49)]], UNSAFE) is None
    at = decide([[Detection("BUTTOCKS_EXPOSED", 0.5)]], UNSAFE)
    assert at == OutputVerdict("BUTTOCKS_EXPOSED", 0.5, 0, 0.5, {"BUTTOCKS_EXPOSED": 0.5})
    # A lower per-label threshold: 0.31 blocks ANUS_EXPOSED but not BUTTOCKS_EXPOSED.
    assert decide([[Detection("ANUS_EXPOSED", 0.31)]], UNSAFE) is not None
    assert decide([[Detection("BUTTOCKS_EXPOSED", 0.31)]], UNSAFE) is None


def test_the_verdict_names_the_highest_unsafe_detection_over_all_frames_and_every_label_score() -> None:
    frames = [
        [Detection("FACE_MALE", 0.9), Detection("BUTTOCKS_EXPOSED", 0.6)],
        [],
        [Detection("ANUS_EXPOSED", 0.7), Detection("BUTTOCKS_EXPOSED", 0.55)],
        [Detection("BUTTOCKS_EXPOSED", 0.2)],
    ]
    verdict = decide(frames, UNSAFE)
    assert verdict is not None
    assert (verdict.reason, verdict.score, verdict.frame_index, verdict.threshold) == (
        "ANUS_EXPOSED",
        0.7,
        2,
        0.3,
    )
    assert verdict.scores == {"FACE_MALE": 0.9, "BUTTOCKS_EXPOSED": 0.6, "ANUS_EXPOSED": 0.7}
    assert "video frame 2" in verdict.message("VIDEO")
    assert "ANUS_EXPOSED" in verdict.message("IMAGE")


def test_no_unsafe_labels_means_nothing_blocks() -> None:
    assert decide([[Detection("BUTTOCKS_EXPOSED", 1.0)]], {}) is None


def test_policy_version_names_the_thresholds() -> None:
    assert policy_version(UNSAFE) == policy_version(dict(reversed(UNSAFE.items())))
    assert policy_version(UNSAFE) != policy_version({**UNSAFE, "ANUS_EXPOSED": 0.4})
    assert policy_version(UNSAFE).startswith("output-")


def test_settings_default_on_with_the_exposed_labels_and_check_thresholds() -> None:
    conf = OutputCheckSettings()
    assert conf.enabled is True
    assert set(conf.unsafe_labels) == {
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "FEMALE_BREAST_EXPOSED",
        "BUTTOCKS_EXPOSED",
        "ANUS_EXPOSED",
    }
    assert set(conf.unsafe_labels.values()) == {0.5}
    with pytest.raises(ValidationError, match="ANUS_EXPOSED"):
        OutputCheckSettings(unsafe_labels={"ANUS_EXPOSED": 1.5})


OUTPUT_VERDICT = {
    "category": "sexual",
    "policy_version": "output-0123456789ab",
    "source": "nudenet",
    "field": "output",
    "reason": "BUTTOCKS_EXPOSED",
    "model_version": "nudenet-3.4.2/320n",
    "score": 0.35566845536231995,
    "scores": {"BUTTOCKS_EXPOSED": 0.35566845536231995, "FACE_FEMALE": 0.25},
}


def test_a_verdict_round_trips_through_the_row_exactly_and_operator_entries_stay_in_the_row() -> None:
    verdict = ModerationVerdict(**OUTPUT_VERDICT)
    row = moderation_row(verdict, quarantine="s3://q/t/2026/12/06/r/", frame_index="0")
    assert row is not None
    assert all(isinstance(v, str) for v in row.values())
    assert row["quarantine"] == "s3://q/t/2026/12/06/r/"
    assert moderation_verdict(row) == verdict


def test_a_prompt_verdict_without_scores_round_trips_with_its_defaults() -> None:
    prompt = ModerationVerdict(
        **{**OUTPUT_VERDICT, "source": "policy", "field": "prompt", "model_version": None}
    )
    prompt.score, prompt.scores = None, {}
    assert moderation_verdict(moderation_row(prompt)) == prompt
    assert moderation_row(None) is None and moderation_verdict(None) is None
    assert moderation_verdict({}) is None


def test_rows_written_before_the_new_fields_read_with_their_defaults() -> None:
    old = {"category": "violence", "policy_version": "p1", "source": "policy", "field": "prompt"}
    defaults = {"reason": "", "model_version": None, "score": None, "scores": {}}
    assert moderation_verdict(old) == ModerationVerdict(**old, **defaults)
    # Rows written with str() on every value, as the sink did before this codec.
    stringly = {**old, "reason": "", "model_version": "None", "score": "None", "scores": "{}"}
    assert moderation_verdict(stringly) == moderation_verdict(old)


def test_the_completion_of_a_blocked_row_encodes_with_the_verdict_and_no_outputs() -> None:
    fields = dict.fromkeys(("message", "retry_after_ms", "created_at", "finished_at"))
    fields.update(dict.fromkeys(("queued_ms", "render_ms", "assemble_ms", "total_ms"), 0))
    row = SimpleNamespace(
        request_id="r1",
        tenant_id="t1",
        status="REJECTED",
        reason_code="OUTPUT_MODERATED",
        moderation=moderation_row(ModerationVerdict(**OUTPUT_VERDICT), quarantine="s3://q/x/"),
        outputs=[],
        labels={},
        **fields,
    )
    completion = completion_from_row(row, blobs=None, presign_ttl_s=60)  # type: ignore[arg-type]
    codec = default_codec()
    _, decoded = codec.decode_any(codec.write(completion))
    assert decoded["moderation"] == OUTPUT_VERDICT
    assert decoded["outputs"] == []
    assert (decoded["status"], decoded["reason_code"]) == ("REJECTED", "OUTPUT_MODERATED")


class Blobs:
    """Staged objects by key (a stand-in for the S3 store: only ``get`` is used here)."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def get(self, bucket: str, key: str) -> bytes:
        return self.objects[key]


def staged(index: int) -> FrameRow:
    return FrameRow(index, "t.0", "staging", f"f{index}", "", 0, 0, 0, 0)


def test_frames_are_checked_in_frame_order_and_an_undecodable_one_is_a_permanent_named_error() -> None:
    red, blue = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    blobs = Blobs({"f0": encode_image(red, "PNG"), "f1": encode_image(blue, "PNG"), "f2": b"not a png"})
    with ThreadPoolExecutor(2) as pool:
        assembler = Assembler(blobs, "results", "quarantine", pool)  # type: ignore[arg-type]
        pixels = assembler.pixels([staged(1), staged(0)])
        assert [p[0, 0].tolist() for p in pixels] == [[255, 0, 0], [0, 0, 255]]
        with pytest.raises(PermanentError, match="staged frame 2") as failed:
            assembler.pixels([staged(0), staged(2)])
    assert failed.value.code == "UNDECODABLE_FRAME"
    assert classify(failed.value) is ErrorKind.PERMANENT


def test_a_renderer_s_check_record_becomes_the_verdict_and_its_moderation_record() -> None:
    clean = {
        "policy_version": "output-abc",
        "model_version": "nudenet-3.4.2/320n",
        "blocked": None,
        "scores": {},
    }
    assert from_record(OutputCheckResult.from_avro(clean)) is None
    blocked = {
        **clean,
        "blocked": {"reason": "BUTTOCKS_EXPOSED", "score": 0.62, "threshold": 0.5, "frame_index": 9},
        "scores": {"BUTTOCKS_EXPOSED": 0.62, "FACE_FEMALE": 0.8},
    }
    found = from_record(OutputCheckResult.from_avro(blocked))
    assert found is not None
    verdict, moderation = found
    assert verdict == OutputVerdict(
        "BUTTOCKS_EXPOSED", 0.62, 9, 0.5, {"BUTTOCKS_EXPOSED": 0.62, "FACE_FEMALE": 0.8}
    )
    assert moderation.to_avro() == {
        "category": "sexual",
        "policy_version": "output-abc",
        "source": "nudenet",
        "field": "output",
        "reason": "BUTTOCKS_EXPOSED",
        "model_version": "nudenet-3.4.2/320n",
        "score": 0.62,
        "scores": {"BUTTOCKS_EXPOSED": 0.62, "FACE_FEMALE": 0.8},
    }
