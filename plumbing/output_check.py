"""Output moderation: decide, before a request's result is published, whether its rendered pixels may be.

Consumes the decoded frames of a request (``HxWx3`` uint8 RGB arrays, images or video frames alike);
produces `OutputVerdict` (a block) or None (publish). Two parts:

* `decide` is the pure rule: a detection blocks when its label is one of the unsafe labels and its score
  reaches that label's threshold; the verdict names the highest-scoring such detection and records, for
  audit, the highest score of every label seen on any frame.
* `NudeNetDetector` runs the ``nudenet`` 320n ONNX detector bundled in its wheel on CPU (nothing is
  downloaded). One onnxruntime session per process with ``threads`` intra-op threads; the sink's request
  workers take turns on it (a lock), so the detector never uses more than ``threads`` cores.

The same pixels always give the same verdict (the detector is a fixed model, the rule is pure), so a
batch handled again after a crash decides as before.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from schemas.records import ModerationVerdict, OutputCheckResult

REASON_CODE = "OUTPUT_MODERATED"
CATEGORY = "sexual"  # every nudenet label is about nudity
SOURCE = "nudenet"
MODEL_FILE = "320n.onnx"


@dataclass(frozen=True)
class Detection:
    """One box the detector found: its label and score (0..1)."""

    label: str
    score: float


@dataclass(frozen=True)
class OutputVerdict:
    """Why a request's output is blocked: the deciding label and score, on which frame, and every label's
    highest score over all frames."""

    reason: str
    score: float
    frame_index: int
    threshold: float
    scores: dict[str, float] = field(default_factory=dict)

    def message(self, kind: str) -> str:
        """The rejection's text for a request of ``kind`` (IMAGE or VIDEO): which frame shows what, and the
        score against its threshold."""
        what = "video frame" if kind == "VIDEO" else "image"
        return (
            f"output moderated: {what} {self.frame_index} shows {self.reason} "
            f"(score {self.score:.2f} >= {self.threshold:.2f})"
        )


def decide(frames: Sequence[Sequence[Detection]], unsafe: Mapping[str, float]) -> OutputVerdict | None:
    """The verdict on a request's frames (detections per frame, in frame order) under ``unsafe`` (label ->
    score threshold); None when no detection of an unsafe label reaches its threshold."""
    scores: dict[str, float] = {}
    worst: tuple[float, int, Detection] | None = None
    for index, detections in enumerate(frames):
        for d in detections:
            scores[d.label] = max(scores.get(d.label, 0.0), d.score)
            threshold = unsafe.get(d.label)
            if threshold is not None and d.score >= threshold and (worst is None or d.score > worst[0]):
                worst = (d.score, index, d)
    if worst is None:
        return None
    score, index, detection = worst
    return OutputVerdict(detection.label, score, index, unsafe[detection.label], scores)


def policy_version(unsafe: Mapping[str, float]) -> str:
    """A short stable name of the thresholds in force, so a verdict says which settings decided it."""
    canonical = json.dumps(sorted(unsafe.items()), separators=(",", ":"))
    return f"output-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"


class NudeNetDetector:
    """The nudenet 320n detector on CPU, one onnxruntime session with ``threads`` intra-op threads."""

    def __init__(self, threads: int = 1) -> None:
        import nudenet
        import nudenet.nudenet as impl
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        model = Path(nudenet.__file__).parent / MODEL_FILE
        session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        # NudeDetector's constructor takes no session options (nudenet 3.4.2) and would start a session
        # with one thread per core; build it without its constructor and give it the bounded session.
        self._detector = nudenet.NudeDetector.__new__(nudenet.NudeDetector)
        self._detector.onnx_session = session
        self._detector.input_name = session.get_inputs()[0].name
        self._detector.input_width = self._detector.input_height = 320
        self.labels: frozenset[str] = frozenset(getattr(impl, "__labels"))
        self._lock = threading.Lock()
        self.model_version = f"nudenet-{version('nudenet')}/{MODEL_FILE.removesuffix('.onnx')}"

    def detect(self, rgb: NDArray[np.uint8]) -> list[Detection]:
        """Detections on one ``HxWx3`` RGB frame (nudenet reads BGR, as ``cv2.imread`` gives)."""
        bgr = np.ascontiguousarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        with self._lock:
            found = self._detector.detect(bgr)
        return [Detection(d["class"], float(d["score"])) for d in found]


class OutputCheck:
    """The unsafe labels and their thresholds, applied to a detector's findings on every frame."""

    def __init__(self, detector: NudeNetDetector, unsafe: Mapping[str, float]) -> None:
        unknown = sorted(set(unsafe) - detector.labels)
        if unknown:
            raise ValueError(
                f"output_check.unsafe_labels names unknown label(s) {unknown}; "
                f"known: {sorted(detector.labels)}"
            )
        self.detector = detector
        self.unsafe = dict(unsafe)
        self.policy_version = policy_version(unsafe)

    def check(self, frames: Sequence[NDArray[np.uint8]]) -> OutputVerdict | None:
        """The verdict on a request's frames, in frame order."""
        return decide([self.detector.detect(f) for f in frames], self.unsafe)

    def moderation(self, verdict: OutputVerdict) -> ModerationVerdict:
        """The Completion's ModerationVerdict record of ``verdict``."""
        return moderation_record(verdict, self.policy_version, self.detector.model_version)


def moderation_record(verdict: OutputVerdict, policy_version: str, model_version: str) -> ModerationVerdict:
    """The Completion's ModerationVerdict record of ``verdict``, made under ``policy_version`` by
    ``model_version``."""
    return ModerationVerdict(
        category=CATEGORY,
        policy_version=policy_version,
        source=SOURCE,
        field="output",
        reason=verdict.reason,
        model_version=model_version,
        score=verdict.score,
        scores=dict(verdict.scores),
    )


def from_record(result: OutputCheckResult) -> tuple[OutputVerdict, ModerationVerdict] | None:
    """A renderer's check (FramesRendered ``output_check``): None when its frames may be published, else
    the verdict (``frame_index`` is the frame's index in the request) and its ModerationVerdict record."""
    blocked = result.blocked
    if blocked is None:
        return None
    verdict = OutputVerdict(
        blocked.reason,
        blocked.score,
        blocked.frame_index,
        blocked.threshold,
        dict(result.scores),
    )
    return verdict, moderation_record(verdict, result.policy_version, result.model_version)
