"""Prompt moderation: decide, before any GPU time is spent, whether a request's texts may be rendered.

Consumes a request's texts as field name -> text (``prompt``, ``negative_prompt``, ``video.prompt_end``;
None or empty is skipped) and produces a `Verdict`: allowed, or blocked with the category, its reason
code, the source (``policy``, the prompt model's name or a classifier's), the field, the policy version
and, when the model was consulted, its version and scores. Pure logic, no I/O but loading the policy
and the model. The policy is in `policy`, the text views in `normalisation`, the model in
`prompt_model`; `build_moderator` puts them together from the gatekeeper's settings.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import TYPE_CHECKING, Protocol

from stream_processors.gatekeeper.normalisation import normalise
from stream_processors.gatekeeper.policy import DEFAULT_POLICY_PATH, Inspection, Policy
from stream_processors.gatekeeper.prompt_model import DEFAULT_MODEL_PATH, PromptModel

if TYPE_CHECKING:
    from plumbing.settings import GatekeeperSettings

__all__ = [
    "DEFAULT_POLICY_PATH",
    "Classifier",
    "Moderator",
    "Policy",
    "Verdict",
    "build_moderator",
    "load_classifier",
    "normalise",
]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What moderation decided; on a block, which rule (category, source) fired on which field."""

    allowed: bool
    policy_version: str
    category: str | None = None
    source: str = "policy"
    field: str | None = None
    matched: str | None = None  # the term or pattern, for operator logs only: never shown to users
    reason: str = ""  # reason code within the category (SEXUAL_MINORS, DOXXING, ...)
    model_version: str | None = None  # the prompt model's version when it was consulted
    score: float | None = None  # the deciding (or, when allowed, the highest) model score
    scores: Mapping[str, float] = dataclass_field(
        default_factory=dict
    )  # every category's model score, for audit


class Classifier(Protocol):
    """A model or service consulted after the policy passes; it sees the original, unnormalised text."""

    name: str

    def classify(self, text: str) -> tuple[str, float] | None:
        """The category ``text`` most likely belongs to and its score (0..1), or None for no opinion."""
        ...


class Moderator:
    """Checks a request's texts against a policy and the prompt model, then against any classifiers.

    Per text: a rule of the policy (term, pattern, Chinese homophone) blocks, unless the text is framed
    as prevention, news, history, medicine or education and its category is not strict; then the model
    decides. A cue (an ambiguous word: "naked", "shoot") blocks when the model's score for its category
    reaches `cue_thresholds`; with no rule or cue, a score reaching `thresholds` blocks.
    """

    def __init__(
        self,
        policy: Policy,
        classifiers: Sequence[Classifier] = (),
        threshold: float = 0.5,
        model: PromptModel | None = None,
        thresholds: Mapping[str, float] | None = None,
        cue_thresholds: Mapping[str, float] | None = None,
    ) -> None:
        for value in (threshold, *(thresholds or {}).values(), *(cue_thresholds or {}).values()):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"threshold {value!r}: must be between 0 and 1")
        self.policy = policy
        self.classifiers = tuple(classifiers)
        self.threshold = threshold
        self.model = model
        self.thresholds = dict(thresholds or {})
        self.cue_thresholds = dict(cue_thresholds or {})

    def check(self, texts: Mapping[str, str | None]) -> Verdict:
        """Policy and model over every field in order, then classifiers (slower) over every field."""
        present = [(name, text) for name, text in texts.items() if text]
        version = self.policy.version
        top: tuple[float, Mapping[str, float]] = (0.0, {})
        for name, text in present:
            verdict = self._check_text(name, text)
            if not verdict.allowed:
                return verdict
            if verdict.score is not None and verdict.score >= top[0]:
                top = (verdict.score, verdict.scores)
        for name, text in present:
            for classifier in self.classifiers:
                result = classifier.classify(text)
                if result is not None and result[1] >= self.threshold:
                    return Verdict(
                        False, version, result[0], classifier.name, name, reason=self.policy.reason(result[0])
                    )
        if self.model is None:
            return Verdict(True, version)
        return Verdict(True, version, model_version=self.model.version, score=top[0], scores=top[1])

    def _check_text(self, name: str, text: str) -> Verdict:
        found = self.policy.inspect(text)
        version, model = self.policy.version, self.model
        if found.hit is not None and (model is None or self.policy.strict(found.hit[0]) or not found.framed):
            category, matched = found.hit
            return Verdict(False, version, category, "policy", name, matched, self.policy.reason(category))
        if model is None:
            return Verdict(True, version)
        scores = model.scores(found.model_text)
        blocking = [
            (score - self._threshold(category, found), category)
            for category, score in scores.items()
            if score >= self._threshold(category, found)
        ]
        if blocking:
            category = max(blocking)[1]
            return Verdict(
                False,
                version,
                category,
                model.name,
                name,
                found.cue[1] if found.cue and found.cue[0] == category else None,
                self.policy.reason(category),
                model.version,
                scores[category],
                scores,
            )
        return Verdict(True, version, model_version=model.version, score=max(scores.values()), scores=scores)

    def _threshold(self, category: str, found: Inspection) -> float:
        """A category's model threshold for this text: the lower cue threshold where a cue of it is
        present and the text is not framed (a framed match is judged like any other text)."""
        if found.cue is not None and found.cue[0] == category and not found.framed:
            return self.cue_thresholds.get(category, self.thresholds.get(category, self.threshold))
        return self.thresholds.get(category, self.threshold)


def load_classifier(spec: str) -> Classifier:
    """Import ``package.module:ClassName`` and instantiate it with no arguments."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"classifier {spec!r}: expected 'package.module:ClassName'")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"classifier {spec!r}: cannot be imported: {exc}") from exc
    instance = factory()
    if not isinstance(getattr(instance, "name", None), str) or not hasattr(instance, "classify"):
        raise TypeError(f"classifier {spec!r}: needs a str `name` and a `classify(text)` method")
    return instance


def build_moderator(conf: GatekeeperSettings) -> Moderator:
    """The Moderator the gatekeeper uses, from its settings: policy, prompt model, thresholds and any
    extra classifiers. `aigc moderation eval` builds it the same way, so it scores what runs."""
    policy = Policy.from_file(conf.policy_path or DEFAULT_POLICY_PATH)
    model = (
        PromptModel.load(conf.prompt_model_path or DEFAULT_MODEL_PATH) if conf.prompt_model_enabled else None
    )
    return Moderator(
        policy,
        [load_classifier(spec) for spec in conf.classifiers],
        conf.classifier_threshold,
        model,
        conf.moderation_thresholds,
        conf.moderation_cue_thresholds,
    )
