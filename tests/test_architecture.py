"""The house rules, checked: layer contracts (import-linter), no cycles, module and class sizes,
docstrings, no test code in the product, and `feature_repo/` importing only the core.

The contracts live in pyproject.toml (``[tool.importlinter]``); docs/architecture.md explains them.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.support.settings import REPO

PRODUCT = ("recsys", "pipelines", "models", "bentos", "benchmarks")
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 250
#: A module over MAX_MODULE_LINES says why at its top, in its docstring, after this phrase.
LONG_REASON = "Why this module is long:"


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(exe), "--no-cache", "--no-logo"], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={"PATH": str(exe.parent), "PYTHONPATH": str(cwd)})


def _product_files() -> list[Path]:
    return sorted(p for pkg in PRODUCT for p in (REPO / pkg).rglob("*.py"))


def _core_modules() -> set[str]:
    """Modules of the core: every module of ``recsys`` outside ``recsys.cli``."""
    return {f"recsys.{p.stem}" for p in (REPO / "recsys").glob("*.py") if p.stem != "__init__"}


def test_the_contracts_hold() -> None:
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_core_contract_names_every_core_module() -> None:
    # a layers contract cannot hold both `recsys` and `recsys.cli`, so the core is listed by module
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    core = next(c for c in config["contracts"] if c["id"] == "core")
    assert set(core["source_modules"]) == _core_modules()
    assert {"pipelines", "models", "bentos", "recsys.cli", "benchmarks"} <= set(core["forbidden_modules"])


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the product's sources and contracts, to plant bad imports in."""
    root = tmp_path_factory.mktemp("house")
    for pkg in PRODUCT:
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__", "results"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


@pytest.mark.parametrize(("module", "planted", "expected"), [
    # a data job reaching up into the service: the layers contract names the import
    ("pipelines/canonical.py", "import bentos.rules", "pipelines.canonical -> bentos.rules"),
    # the core reaching up into the CLI
    ("recsys/schema.py", "import recsys.cli.common", "recsys.schema -> recsys.cli.common"),
    # a loop between two sibling modules (models.als imports models.protocol): named relative to models
    ("models/protocol.py", "import models.als", "No cycles are allowed in models.\nIt could be made acyclic by "
                                                "removing 1 dependency:\n\n- .protocol -> .als"),
])
def test_a_planted_back_arrow_breaks_the_build(sandbox: Path, module: str, planted: str, expected: str) -> None:
    path = sandbox / module
    original = path.read_text()
    try:
        path.write_text(original + f"\n{planted}  # planted by the test\n")
        result = _lint_imports(sandbox)
    finally:
        path.write_text(original)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout
    assert expected in result.stdout, result.stdout


def test_the_sandbox_is_clean_without_the_plant(sandbox: Path) -> None:
    # the copy passes as it is, so a failure above is the planted import and nothing else
    result = _lint_imports(sandbox)
    assert result.returncode == 0, result.stdout + result.stderr


def _imported_names(tree: ast.AST) -> list[str]:
    """Every module an import statement names (``from a import b`` gives ``a.b``: b may be a module)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_imported_names_sees_both_import_forms() -> None:
    tree = ast.parse("from recsys import schema as S\nimport pipelines.stream\nfrom . import x")
    assert _imported_names(tree) == ["recsys.schema", "pipelines.stream"]  # relative imports stay inside


def test_feature_repo_imports_only_the_core() -> None:
    allowed = _core_modules()
    for path in (REPO / "feature_repo").glob("*.py"):
        for name in _imported_names(ast.parse(path.read_text())):
            if name.split(".")[0] in PRODUCT:
                assert any(name == m or name.startswith(m + ".") for m in allowed), f"{path.name} imports {name}"


def test_no_product_code_imports_the_tests() -> None:
    offenders = [str(p.relative_to(REPO)) for p in _product_files()
                 if any(line.lstrip().startswith(("from tests", "import tests")) for line in p.read_text().splitlines())]
    assert offenders == []


def test_modules_are_small_and_say_what_they_own() -> None:
    problems = []
    for path in _product_files():
        text = path.read_text()
        if not text.strip():
            continue  # an empty __init__.py
        tree = ast.parse(text)
        doc = ast.get_docstring(tree)
        name = str(path.relative_to(REPO))
        if not doc:
            problems.append(f"{name}: no opening docstring saying what the module owns")
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES and LONG_REASON not in (doc or ""):
            problems.append(f"{name}: {lines} lines, over {MAX_MODULE_LINES} with no '{LONG_REASON}' at its top")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                problems.append(f"{name}: class {node.name} is {node.end_lineno - node.lineno + 1} lines")
    assert problems == []
