"""The real nudenet detector (its bundled 320n ONNX model, on CPU) on real pixels, as the assembler runs it.

No nude image ships with the project, so the positive here is a genuine detection nudenet makes on a
picture we can draw: the synthetic backend's striped frame for seed 95 and prompt "stripes 5" scores
BUTTOCKS_EXPOSED about 0.36. That passes the default threshold (0.5) and is blocked when a setting
lowers BUTTOCKS_EXPOSED's threshold to 0.3, which is what the e2e test relies on. Needs no services.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import sklearn

from gpu_consumers.backends.base import FrameSpec
from gpu_consumers.backends.synthetic import draw_frame
from plumbing.output_check import NudeNetDetector, OutputCheck
from plumbing.settings import OutputCheckSettings

FLAGGED = FrameSpec(seed_start=95, seed_end=95, position=0.0, prompt="stripes 5")
CLEAN = FrameSpec(seed_start=7, seed_end=7, position=0.0, prompt="stripes 0")
SAMPLES = Path(sklearn.__file__).parent / "datasets" / "images"  # photos shipped in scikit-learn's wheel


@pytest.fixture(scope="module")
def detector() -> NudeNetDetector:
    return NudeNetDetector(threads=1)


def photo(name: str) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(SAMPLES / name)), cv2.COLOR_BGR2RGB)


def test_clean_images_pass_the_default_check(detector: NudeNetDetector) -> None:
    check = OutputCheck(detector, OutputCheckSettings().unsafe_labels)
    frames = [draw_frame(CLEAN, 512, 512), photo("china.jpg"), photo("flower.jpg")]
    assert check.check(frames) is None
    assert detector.detect(frames[0]) == []


def test_a_real_detection_is_blocked_only_from_the_threshold_a_setting_gives(
    detector: NudeNetDetector,
) -> None:
    flagged = draw_frame(FLAGGED, 512, 512)
    found = {d.label: d.score for d in detector.detect(flagged)}
    assert 0.3 < found["BUTTOCKS_EXPOSED"] < 0.5, found
    assert OutputCheck(detector, OutputCheckSettings().unsafe_labels).check([flagged]) is None

    check = OutputCheck(detector, {"BUTTOCKS_EXPOSED": 0.3})
    verdict = check.check([draw_frame(CLEAN, 512, 512), flagged])
    assert verdict is not None
    assert (verdict.reason, verdict.frame_index) == ("BUTTOCKS_EXPOSED", 1)
    assert verdict.score == pytest.approx(found["BUTTOCKS_EXPOSED"])
    assert check.check([flagged]) == check.check([flagged])  # deterministic: a retry decides the same
    moderation = check.moderation(verdict)
    assert moderation.source == "nudenet" and moderation.field == "output"
    assert moderation.model_version is not None and moderation.model_version.startswith("nudenet-3.")
    assert moderation.model_version.endswith("/320n")


def test_an_unknown_label_in_the_settings_is_refused(detector: NudeNetDetector) -> None:
    with pytest.raises(ValueError, match="BUTTOCKS_NAKED"):
        OutputCheck(detector, {"BUTTOCKS_NAKED": 0.5})
