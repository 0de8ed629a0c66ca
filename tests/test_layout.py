"""The layout's promises, checked on the source: dependencies run one way (scripts -> training -> data, losses, model)
and no module imports itself through a cycle, function-level imports included (they hide cycles from Python)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

SCRIPTS = {"train", "eval", "sample", "rejection_sample"}
LIBRARY = {"data", "losses", "model"}  # below training/


def project_modules() -> dict[str, Path]:
    """Module name -> file, for every project module outside tests/, experiments/ and bench/ (scripts of their own)."""
    mods = {}
    for path in REPO_ROOT.rglob("*.py"):
        rel = path.relative_to(REPO_ROOT)
        if rel.parts[0].startswith(".") or rel.parts[0] in ("tests", "experiments", "bench"):
            continue
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        mods[name] = path
    return mods


def imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """The project modules `path` imports anywhere in its body (resolved to the longest module name that exists)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {name: imports(path, mods) - {name} for name, path in mods.items()}


def test_dependencies_run_one_way():
    g = graph()
    assert {"training.setup", "training.batches", "model.generate", "data.datasets"} <= set(g)  # the walk saw them
    wrong = []
    for name, deps in g.items():
        top = name.split(".")[0]
        for dep in deps:
            dep_top = dep.split(".")[0]
            if top in LIBRARY and (dep_top == "training" or dep_top in SCRIPTS or dep_top == "cli"):
                wrong.append(f"{name} -> {dep}")
            if top == "training" and dep_top in SCRIPTS:
                wrong.append(f"{name} -> {dep}")
    assert not wrong, "imports against the layout: " + ", ".join(sorted(wrong))


def test_no_import_cycle():
    g = graph()
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    # A package imports its submodules' parent: 'model' (model/__init__.py) importing 'model.qwen2' is no cycle,
    # but a submodule importing its own package's __init__ that imports it back would be.
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_the_checks_see_a_cycle(tmp_path: Path):
    """The walk is not blind: a planted two-module cycle and a function-level import are both found."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    mods = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    assert imports(mods["a"], mods) == {"b"} and imports(mods["b"], mods) == {"a"}
