"""Names line up: every topic has a schema, every schema a topic; stages meet only through topics."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from plumbing.settings import ModelSpec, Settings
from plumbing.topics import Stage, Topics
from schemas.codec import SCHEMA_DIR, Codec

REPO = Path(__file__).resolve().parents[2]
STAGES = ("producers", "stream_processors", "gpu_consumers")


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def test_every_topic_has_a_schema_and_every_schema_a_topic():
    settings = Settings.load(
        models={"a": ModelSpec(path=Path("a"), pool="gpu-a"), "b": ModelSpec(path=Path("b"))}
    )
    specs = Topics(settings).all()
    codec = Codec()
    assert {s.schema for s in specs} == set(codec.records)
    for record in codec.records:
        assert (SCHEMA_DIR / f"{snake(record)}.avsc").exists(), record


def test_topic_names_are_lowercase_dotted_and_unique():
    settings = Settings.load(models={"a": ModelSpec(path=Path("a"), pool="gpu-a")})
    names = [s.name for s in Topics(settings).all()]
    assert len(names) == len(set(names))
    for name in names:
        assert re.fullmatch(r"[a-z0-9-]+(\.[a-z0-9-]+)+", name), name
    topics = Topics(settings)
    assert topics.render("gpu-a", "HIGH") == "aigc.render.gpu-a.high"
    assert topics.retry(Stage.RENDERER, 10) == "aigc.retry.renderer.10s"
    assert topics.retry(Stage.RENDERER, 0.5) == "aigc.retry.renderer.500ms"
    assert topics.dlq("assembler") == "aigc.dlq.assembler"


def test_cancellations_are_compacted():
    spec = next(s for s in Topics(Settings.load()).all() if s.name == "aigc.cancellations")
    assert "compact" in spec.config["cleanup.policy"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_stages_never_import_each_other():
    offenders = []
    for stage in STAGES:
        for path in (REPO / stage).rglob("*.py"):
            others = _imports(path) & (set(STAGES) - {stage})
            if others:
                offenders.append(f"{path.relative_to(REPO)} imports {sorted(others)}")
    assert offenders == []


def test_no_module_shadows_the_standard_library():
    import sys

    ours = [p for pkg in ("plumbing", "schemas", "infra", *STAGES) for p in (REPO / pkg).rglob("*.py")]
    clashes = [str(p.relative_to(REPO)) for p in ours if p.stem in sys.stdlib_module_names]
    assert clashes == []
