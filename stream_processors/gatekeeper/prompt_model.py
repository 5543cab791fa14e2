"""The shipped prompt classifier: a linear model over character and word n-grams, one score per category.

Consumes the text `Policy.inspect` prepares (normalised, simplified Chinese, with its pinyin) and produces
a probability per harm category. Trained by `stream_processors.gatekeeper.training`, which writes two
files that are no pickle: ``<name>.npz`` (idf weights, coefficients, intercepts: plain arrays) and
``<name>.json`` (n-gram vocabularies, categories, version, the npz's sha256, checked on load).

Training and scoring cut the text into n-grams with the same functions (`ANALYZERS`; training hands them to
sklearn's TfidfVectorizer as its analyzers), so scoring never imports sklearn (with scipy.stats): a gatekeeper
took 3.6-5.2 s to import and build its moderator here with it, 1.9-2.9 s without (8.7-9.9 s and 4.2-4.4 s
before the packages' bytecode was compiled at install). A score is then a dict
look-up per n-gram and a sum of coefficient rows: about 50-150 µs, where a full sklearn transform costs
several hundred.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MODEL_PATH = Path(__file__).parent / "model" / "prompt_classifier.json"
_WHITE_SPACES = re.compile(r"\s\s+")
_WORD = re.compile(r"(?u)\b\w\w+\b")  # sklearn's default token_pattern


def char_wb_ngrams(text: str) -> list[str]:
    """Character 1- to 4-grams inside words, each word padded with a space at both ends: what sklearn's
    ``analyzer="char_wb", ngram_range=(1, 4)`` gives for text that needs no lower-casing."""
    grams: list[str] = []
    for word in _WHITE_SPACES.sub(" ", text).split():
        padded = f" {word} "
        for n in range(1, 5):
            grams += [padded[i : i + n] for i in range(max(len(padded) - n + 1, 1))]
            if len(padded) <= n:  # a word shorter than n counts once, as the whole padded word
                break
    return grams


def word_ngrams(text: str) -> list[str]:
    """Words of two or more word characters, then each adjacent pair: sklearn's ``analyzer="word",
    ngram_range=(1, 2)`` with its default token pattern and no lower-casing."""
    words = _WORD.findall(text)
    return words + [f"{a} {b}" for a, b in itertools.pairwise(words)]


# The feature blocks: name -> its analyzer, and name -> the rest of its TfidfVectorizer arguments (training).
ANALYZERS: dict[str, Callable[[str], list[str]]] = {"char": char_wb_ngrams, "word": word_ngrams}
FEATURES: dict[str, dict[str, Any]] = {
    "char": {"max_features": 60000, "sublinear_tf": True},
    "word": {"max_features": 20000, "sublinear_tf": True},
}


class ModelError(ValueError):
    """The model files are missing, mismatched or malformed."""


class PromptModel:
    """Loaded once per process, then `scores(text)` per prompt; immutable and thread-safe."""

    def __init__(
        self,
        name: str,
        version: str,
        categories: Sequence[str],
        blocks: Sequence[tuple[Callable[[str], list[str]], dict[str, int], np.ndarray, int]],
        coef: np.ndarray,
        intercept: np.ndarray,
    ) -> None:
        self.name = name
        self.version = version
        self.categories = tuple(categories)
        self._blocks = blocks  # (analyzer, vocabulary gram -> column, the block's idf, its first column)
        self._coef = coef  # (columns, categories)
        self._intercept = intercept

    @classmethod
    def load(cls, path: Path = DEFAULT_MODEL_PATH) -> PromptModel:
        """Read ``<name>.json`` and its ``<name>.npz``; ModelError when the pair does not match."""
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            arrays_path = path.with_suffix(".npz")
            raw = arrays_path.read_bytes()
        except (OSError, ValueError) as exc:
            raise ModelError(f"prompt model {path}: cannot be read: {exc}") from exc
        digest = hashlib.sha256(raw).hexdigest()
        if digest != meta.get("sha256"):
            raise ModelError(
                f"prompt model {path}: {arrays_path.name} has sha256 {digest}, expected {meta.get('sha256')}"
            )
        with np.load(arrays_path, allow_pickle=False) as arrays:
            coef, intercept = arrays["coef"].astype(np.float32), arrays["intercept"].astype(np.float32)
            idfs = {name: arrays[f"idf_{name}"] for name in FEATURES}
        blocks, offset = [], 0
        for name in FEATURES:
            grams: list[str] = meta["vocabulary"][name]
            vocabulary = {gram: offset + n for n, gram in enumerate(grams)}
            blocks.append((ANALYZERS[name], vocabulary, idfs[name], offset))
            offset += len(grams)
        if coef.shape != (offset, len(meta["categories"])):
            raise ModelError(f"prompt model {path}: coefficients {coef.shape} do not fit the vocabulary")
        return cls(meta["name"], meta["version"], meta["categories"], blocks, coef, intercept)

    def scores(self, text: str) -> dict[str, float]:
        """Probability per category that `text` belongs to it (one-vs-rest logistic regression)."""
        logits = self._intercept.astype(np.float64)
        for analyzer, vocabulary, idf, offset in self._blocks:
            counts = Counter(map(vocabulary.get, analyzer(text)))  # C loops: the hot spot of a check
            counts.pop(None, None)
            if not counts:
                continue
            columns = np.fromiter(counts, dtype=np.intp, count=len(counts))
            tf = np.fromiter(
                (1.0 + math.log(c) for c in counts.values()), dtype=np.float64, count=len(counts)
            )
            weights = tf * idf[columns - offset]
            weights /= math.sqrt(float(weights @ weights))
            logits = logits + weights @ self._coef[columns]
        return {c: 1.0 / (1.0 + math.exp(-float(z))) for c, z in zip(self.categories, logits, strict=True)}
