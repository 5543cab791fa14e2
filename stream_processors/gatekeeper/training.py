"""Train the shipped prompt classifier: ``python -m stream_processors.gatekeeper.training``.

Generates the corpus (`corpus.generate`, seeded), turns each prompt into the text the gatekeeper's model
reads (`Policy.inspect(...).model_text` of the shipped policy), fits TF-IDF character and word n-grams
and one logistic regression per category on the train split only, and writes:

- ``model/prompt_classifier.npz`` and ``.json``: the artefact the gatekeeper loads by default;
- ``model/prompt_classifier.metrics.json``: the model alone (no policy) on the test split, with the
  corpus sizes and the artefact's sha256, so a rerun can be compared with what is shipped;
- the test split as JSONL (default ``.aigc/moderation/test.jsonl``) for ``aigc moderation eval``.

The test split is never used to fit or tune anything. Same seed and library versions, same artefact.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from stream_processors.gatekeeper.corpus import CATEGORIES, Row, generate
from stream_processors.gatekeeper.evaluation import breakdown
from stream_processors.gatekeeper.policy import DEFAULT_POLICY_PATH, Policy
from stream_processors.gatekeeper.prompt_model import ANALYZERS, DEFAULT_MODEL_PATH, FEATURES, PromptModel

log = logging.getLogger(__name__)
MODEL_NAME = "prompt-linear"
DEFAULT_TEST_SPLIT = Path(".aigc/moderation/test.jsonl")  # the dev split goes beside it, dev.jsonl
TRAIN_PER_CELL = 60  # unsafe prompts per category, language and evasion kind (and as many safe)
TEST_PER_CELL = 12
C = 8.0  # inverse regularisation strength of each logistic regression


def vectorizers() -> dict[str, TfidfVectorizer]:
    """Fresh, unfitted vectorizers for each feature block, cutting n-grams with the scorer's own analyzers."""
    return {
        name: TfidfVectorizer(analyzer=ANALYZERS[name], dtype=np.float32, **args)
        for name, args in FEATURES.items()
    }


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz (what `np.load` reads) with fixed timestamps, so the same arrays give the same bytes."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(2026, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())
    return out.getvalue()


def train(
    train_rows: list[Row], policy: Policy, c: float = C
) -> tuple[dict[str, Any], dict[str, np.ndarray], Callable[[list[str]], np.ndarray]]:
    """Fit the model on `train_rows`: its JSON metadata (without sha256), its arrays, and sklearn's own
    probabilities (texts -> rows of per-category scores) to check the exported model against."""
    texts = [policy.inspect(row.prompt).model_text for row in train_rows]
    fitted = vectorizers()
    matrix = sparse.hstack([fitted[name].fit_transform(texts) for name in FEATURES]).tocsr()
    coef, intercept, regressions = [], [], []
    for category in CATEGORIES:
        target = np.array([row.label == "unsafe" and row.category == category for row in train_rows])
        regression = LogisticRegression(C=c, max_iter=3000)
        regression.fit(matrix, target)
        regressions.append(regression)
        coef.append(regression.coef_[0])
        intercept.append(regression.intercept_[0])
    arrays = {
        "coef": np.array(coef, dtype=np.float32).T.copy(),
        "intercept": np.array(intercept, dtype=np.float32),
        **{f"idf_{name}": fitted[name].idf_.astype(np.float32) for name in FEATURES},
    }
    vocabulary = {
        name: [gram for gram, _ in sorted(fitted[name].vocabulary_.items(), key=lambda item: item[1])]
        for name in FEATURES
    }
    meta = {"name": MODEL_NAME, "categories": list(CATEGORIES), "vocabulary": vocabulary}

    def reference(texts: list[str]) -> np.ndarray:
        features = sparse.hstack([fitted[name].transform(texts) for name in FEATURES]).tocsr()
        return np.column_stack([r.predict_proba(features)[:, 1] for r in regressions])

    return meta, arrays, reference


def save(meta: dict[str, Any], arrays: dict[str, np.ndarray], path: Path) -> str:
    """Write ``path`` (.json) and its .npz; the version and sha256 name the arrays. Returns the sha256."""
    raw = _npz_bytes(arrays)
    digest = hashlib.sha256(raw).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".npz").write_bytes(raw)
    meta = {**meta, "version": f"{MODEL_NAME}-{digest[:12]}", "sha256": digest}
    path.write_text(json.dumps(meta, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    return digest


def main(argv: list[str] | None = None) -> int:
    """Write the test and dev splits, train the prompt model on the train split and save its artefact."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=10, help="corpus seed (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH, help="artefact .json to write")
    parser.add_argument(
        "--test-split", type=Path, default=DEFAULT_TEST_SPLIT, help="test split JSONL to write"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    policy = Policy.from_file(DEFAULT_POLICY_PATH)
    train_rows = list(generate("train", TRAIN_PER_CELL, args.seed))
    test_rows = list(generate("test", TEST_PER_CELL, args.seed))
    log.info(
        "corpus: %d train rows, %d test rows (disjoint templates and vocabulary)",
        len(train_rows),
        len(test_rows),
    )
    dev_rows = list(generate("dev", TEST_PER_CELL, args.seed))
    args.test_split.parent.mkdir(parents=True, exist_ok=True)
    for path, rows in ((args.test_split, test_rows), (args.test_split.with_name("dev.jsonl"), dev_rows)):
        with path.open("w", encoding="utf-8") as out:
            out.writelines(json.dumps(row.as_dict(), ensure_ascii=False) + "\n" for row in rows)
    meta, arrays, _ = train(train_rows, policy)
    digest = save(meta, arrays, args.model)
    size = args.model.with_suffix(".npz").stat().st_size + args.model.stat().st_size
    log.info("model: %s and its .npz (%d KiB), sha256 %s", args.model, size // 1024, digest)
    model = PromptModel.load(args.model)
    texts = [policy.inspect(row.prompt).model_text for row in test_rows]
    blocked = [max(model.scores(text).values()) >= 0.5 for text in texts]
    report = breakdown([row.as_dict() for row in test_rows], blocked)
    metrics = {
        "seed": args.seed,
        "sha256": digest,
        "version": model.version,
        "train_rows": len(train_rows),
        "test_rows": len(test_rows),
        "model_alone_on_test_split": report,
    }
    args.model.with_suffix(".metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    overall = report["overall"]
    log.info(
        "model alone on the test split: recall %.3f, FPR %.3f, precision %.3f (written to %s; test split %s)",
        overall["recall"],
        overall["fpr"],
        overall["precision"],
        args.model.with_suffix(".metrics.json"),
        args.test_split,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
