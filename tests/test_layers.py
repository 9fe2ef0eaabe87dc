"""The layering the README's "How the code is laid out" shows: base modules (models, data, config,
io, ...) never import the work modules above them, and the shells reach the library through the
stage layer. Read from the source (every import, including those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

BASE = ("cogvx.models", "cogvx.data", "cogvx.config", "cogvx.io", "cogvx.errors", "cogvx.hashing",
        "cogvx.reports", "cogvx.tensorfile", "cogvx.hub", "cogvx.runlock", "cogvx.distributed")
ABOVE_BASE = ("cogvx.training", "cogvx.generate", "cogvx.tracking", "cogvx.cli", "cogvx.stages",
              "cogvx.prepare", "cogvx.benchmark", "cogvx.check", "cogvx.inference")
# The library modules that do a pipeline's work: shells call them through cogvx.stages only.
STAGE_WORK = ("cogvx.prepare", "cogvx.training", "cogvx.check", "cogvx.data.download", "cogvx.models.build",
              "cogvx.tracking")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == package or name.startswith(package + ".") for package in packages)


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def test_base_modules_import_nothing_above_them():
    wrong = {f"{module_name(path)} imports {name}" for path in sources("cogvx")
             if within(module_name(path), BASE) for name in imports(path) if within(name, ABOVE_BASE)}
    assert not wrong, sorted(wrong)


def test_the_shells_reach_the_pipeline_work_through_the_stage_layer():
    shells = [*sources("tasks", "flows"), REPO / "cogvx" / "cli.py"]
    wrong = {f"{path.relative_to(REPO)} imports {name}" for path in shells for name in imports(path)
             if within(name, STAGE_WORK)}
    assert not wrong, sorted(wrong)


def test_the_checks_see_a_violation():
    """The import reader finds imports inside functions too (what a lazy import would hide)."""
    sample = REPO / "cogvx" / "training" / "loop.py"
    assert "cogvx.tracking" in imports(sample) and within("cogvx.models.specs", BASE)
