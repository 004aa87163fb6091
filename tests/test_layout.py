"""The house's rules, checked on the source: three layers, no import cycle, no private
name crossing a module, an engine without transformers, short functions."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "zoobj"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(path: Path):
    """``(imported module, names taken from it, line)`` for every zoobj import in the file,
    top-level or inside a function; ``from pkg import mod`` counts as importing ``pkg.mod``."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "zoobj":
                    yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "zoobj":
            names = [a.name for a in node.names]
            subs = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in MODULES]
            if subs:
                for sub in subs:
                    yield sub, [], node.lineno
            rest = [n for n in names if f"{node.module}.{n}" not in MODULES]
            if rest or not subs:
                yield node.module, rest, node.lineno


def graph() -> dict[str, set[str]]:
    return {m: {target for target, _, _ in imports(p) if target != m} for m, p in MODULES.items()}


def test_the_three_layers_are_folders():
    for layer, members in {"engine": ("mezo", "noise", "perturb", "shaping", "rules", "settings", "calibrate", "trajectory"),
                           "model": ("loading", "blocks", "params", "template", "inference", "kv", "prefix",
                                     "tail_probes"),
                           "run": ("config", "objective", "session", "train", "export", "compare", "plots",
                                   "distributed")}.items():
        assert all(f"zoobj.{layer}.{m}" in MODULES for m in members), layer
    flat = sorted(m for m in MODULES if m.count(".") == 1 and not (ROOT / m.split(".")[1]).is_dir())
    assert flat == ["zoobj.__main__", "zoobj.cli", "zoobj.errors"]


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(g.get(m, ())):
            if n not in MODULES:
                continue
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path[path.index(n):] + [n] if n in path else path + [n])
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])


def test_no_private_name_crosses_a_module():
    crossing = []
    for m, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> zoobj module it stands for
        for target, names, line in imports(path):
            crossing += [f"{m}:{line} imports {target}.{n}" for n in names if n.startswith("_") and target != m]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("zoobj"):
                for a in node.names:
                    if f"{node.module}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                crossing.append(f"{m}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not crossing, crossing


def test_the_engine_imports_without_transformers():
    engine = sorted(m for m in MODULES if m.startswith("zoobj.engine"))
    code = ("import sys; sys.modules['transformers'] = None; sys.modules['peft'] = None\n"
            f"import {', '.join(engine)}\n"
            "assert not any(k.startswith('zoobj.model') or k.startswith('zoobj.run') for k in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent)
    assert done.returncode == 0, done.stderr[-2000:]


def test_mezo_stays_short_and_no_function_is_long():
    assert len((ROOT / "engine" / "mezo.py").read_text().splitlines()) <= 450
    long = []
    for m, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{m}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long


def test_the_training_loop_asks_no_object_what_it_has():
    source = (ROOT / "run" / "train.py").read_text()
    assert "hasattr(" not in source and "getattr(objective" not in source
