"""The import layer order, bottom to top, and stages that never import each other.

    schemas < plumbing < infra < stages < stream_processors (package level) < producers < bench < aigc

A module may import its own unit and any lower layer, never a higher one; the stages share a layer and
none imports another. Every import counts: module-level and function-level (lazy) ``import`` statements,
``importlib.import_module("...")`` and ``__import__("...")``, and any string literal that spells one of
our modules (``"producers.cli"`` in a list of modules to import). ``python -m <module>`` in an argument
list starts a new process, not an import: it must name a module that exists, at any layer.
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# (layer, its units). A unit is a package or module prefix; a module belongs to its longest matching unit.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("schemas", ("schemas",)),
    ("plumbing", ("plumbing",)),
    ("infra", ("infra",)),
    (
        "stages",
        (
            "stream_processors.gatekeeper",
            "stream_processors.assembler",
            "stream_processors.webhooks",
            "stream_processors.relay",
            "gpu_consumers",
        ),
    ),
    # stream_processors' own package level (cli.py) registers the verbs of its stages, so it sits above them.
    ("stream_processors", ("stream_processors",)),
    ("producers", ("producers",)),
    ("bench", ("bench",)),
    ("aigc", ("aigc",)),
)
STAGES = "stages"
PACKAGES = tuple(dict.fromkeys(unit.split(".")[0] for _, units in LAYERS for unit in units))
_DOTTED = re.compile(r"(?:{})(?:\.\w+)+".format("|".join(PACKAGES)))


@dataclass(frozen=True)
class Violation:
    """One import the order forbids, where it is and the rule it breaks."""

    where: str  # path:line
    module: str
    rule: str

    def __str__(self) -> str:
        return f"{self.where}: imports {self.module}: {self.rule}"


def unit_of(module: str) -> tuple[int, str, str] | None:
    """(layer index, layer, unit) of one of our modules; None for anything else."""
    best: tuple[int, str, str] | None = None
    for index, (layer, units) in enumerate(LAYERS):
        for unit in units:
            if (module == unit or module.startswith(unit + ".")) and (
                best is None or len(unit) > len(best[2])
            ):
                best = (index, layer, unit)
    return best


def module_name(root: Path, path: Path) -> str:
    """The dotted name of the module in ``path`` (a package's ``__init__`` is the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def exists(root: Path, module: str) -> bool:
    """Whether ``module`` is a module or package under ``root``."""
    path = root.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _call_name(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def references(
    root: Path, tree: ast.AST, module: str, is_package: bool
) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(imports, process targets) of one module: (line, dotted name) each, wherever in the file they are.

    A string literal counts as an import when it spells a module of ours that exists (``"aigc.origin"``
    is a header name, not a module).
    """
    imports: list[tuple[int, str]] = []
    targets: list[tuple[int, str]] = []
    seen_strings: set[int] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            imports.append((node.lineno, name))
        elif isinstance(node, (ast.List, ast.Tuple)):
            for flag, arg in zip(node.elts, node.elts[1:], strict=False):
                if isinstance(flag, ast.Constant) and flag.value == "-m" and isinstance(arg, ast.Constant):
                    targets.append((arg.lineno, str(arg.value)))
                    seen_strings.add(id(arg))
        elif isinstance(node, ast.Call) and _call_name(node) in ("import_module", "__import__"):
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                imports.append((node.lineno, first.value))
                seen_strings.add(id(first))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in seen_strings
            and _DOTTED.fullmatch(node.value)
            and exists(root, node.value)
        ):
            imports.append((node.lineno, node.value))
    return imports, targets


def check(root: Path) -> list[Violation]:
    """Every import under ``root``'s packages that breaks the layer order or crosses between stages."""
    found: list[Violation] = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module = module_name(root, path)
            here = unit_of(module)
            assert here is not None, f"{module} is in no layer: add it to LAYERS"
            tree = ast.parse(path.read_text(encoding="utf-8"))
            imports, targets = references(root, tree, module, path.stem == "__init__")
            where = f"{path.relative_to(root)}:{{}}"
            for line, name in targets:
                if unit_of(name) is not None and not exists(root, name):
                    found.append(Violation(where.format(line), name, "python -m names no module of ours"))
            for line, name in imports:
                there = unit_of(name)
                if there is None or there[2] == here[2]:
                    continue
                if there[0] > here[0]:
                    found.append(
                        Violation(
                            where.format(line), name, f"{here[1]} may not import the higher layer {there[1]}"
                        )
                    )
                elif there[0] == here[0] and here[1] == STAGES:
                    found.append(
                        Violation(
                            where.format(line), name, f"stage {here[2]} may not import stage {there[2]}"
                        )
                    )
    return found


def test_the_code_keeps_the_layer_order():
    violations = check(REPO)
    assert not violations, "\n" + "\n".join(map(str, violations))


def test_every_package_has_a_layer():
    ours = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests"}
    assert ours == set(PACKAGES)


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    for package in PACKAGES:
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()
    return root


def test_the_checker_reports_each_kind_of_forbidden_import(tmp_path: Path):
    root = _tree(
        tmp_path,
        {
            "plumbing/top.py": "from infra import launcher\n",
            "plumbing/lazy.py": "def f():\n    import producers.client\n",
            "plumbing/dynamic.py": "import importlib\nimportlib.import_module('bench.cli')\n",
            "plumbing/dunder.py": "__import__('gpu_consumers.cli', fromlist=['register'])\n",
            "plumbing/string.py": "NAMES = ('schemas.codec', 'stream_processors.cli')\n",
            "plumbing/spawn.py": "OK = ['python', '-m', 'aigc']\nBAD = ['python', '-m', 'plumbing.no']\n",
            "stream_processors/gatekeeper/app.py": "from stream_processors.assembler import sink\n",
            "stream_processors/relay.py": "from .webhooks import store\n",
            "gpu_consumers/cli.py": "from stream_processors import cli\n",
            "stream_processors/cli.py": "from stream_processors.gatekeeper import app\nimport producers\n",
            "aigc/cli.py": "import bench.cli\nimport schemas\n",
            "aigc/__main__.py": "",
        },
    )
    found = {(v.where, v.module, v.rule) for v in check(root)}
    assert found == {
        ("plumbing/top.py:1", "infra", "plumbing may not import the higher layer infra"),
        ("plumbing/lazy.py:2", "producers.client", "plumbing may not import the higher layer producers"),
        ("plumbing/dynamic.py:2", "bench.cli", "plumbing may not import the higher layer bench"),
        ("plumbing/dunder.py:1", "gpu_consumers.cli", "plumbing may not import the higher layer stages"),
        (
            "plumbing/string.py:1",
            "stream_processors.cli",
            "plumbing may not import the higher layer stream_processors",
        ),
        ("plumbing/spawn.py:2", "plumbing.no", "python -m names no module of ours"),
        (
            "stream_processors/gatekeeper/app.py:1",
            "stream_processors.assembler",
            "stage stream_processors.gatekeeper may not import stage stream_processors.assembler",
        ),
        (
            "stream_processors/relay.py:1",
            "stream_processors.webhooks",
            "stage stream_processors.relay may not import stage stream_processors.webhooks",
        ),
        (
            "gpu_consumers/cli.py:1",
            "stream_processors",
            "stages may not import the higher layer stream_processors",
        ),
        (
            "stream_processors/cli.py:2",
            "producers",
            "stream_processors may not import the higher layer producers",
        ),
    }


def test_a_clean_tree_passes(tmp_path: Path):
    root = _tree(
        tmp_path, {"infra/a.py": "from plumbing import b\nimport schemas.codec\n", "plumbing/b.py": ""}
    )
    assert check(root) == []
