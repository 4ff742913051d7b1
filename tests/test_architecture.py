"""The house rules, checked: one room per stage with imports flowing one way (in the source, ``TYPE_CHECKING``
imports included, and in what a fresh interpreter really loads), no private names across modules, and entry points
that stay light (no torch at import)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "gradlens"

# The stages in import order: a module may import its own stage or an earlier one, never a later one. Within the
# tasks/models stage the finer order is tasks -> toy world -> models -> LoRA -> evaluation -> drift -> sparse B. The
# longest matching prefix decides a module's stage.
STAGES: dict[str, float] = {
    "gradlens": 0, "gradlens.errors": 0, "gradlens.provenance": 0, "gradlens.fsio": 0, "gradlens.modules": 0,
    "gradlens.config": 0, "gradlens.budget": 0, "gradlens.stats": 0, "gradlens.stats.core": 0,
    "gradlens.stats.streaming": 0, "gradlens.stats.device": 0, "gradlens.toy_presets": 0, "gradlens.callback_order": 0,
    "gradlens.lazy": 0, "gradlens.hub": 0, "gradlens.dtensors": 0, "gradlens.engines": 0,
    "gradlens.tasks": 1.0, "gradlens.tasks.prompt_format": 1.0,
    "gradlens.toy": 1.1,
    "gradlens.models": 1.2,
    "gradlens.lora": 1.25,
    "gradlens.evaluate": 1.3, "gradlens.toy_base_report": 1.3,
    "gradlens.drift": 1.5,
    "gradlens.sparse": 1.6,
    "gradlens.store": 2,
    "gradlens.record": 3,
    "gradlens.training": 3.5,
    "gradlens.analysis": 4,
    "gradlens.placement": 5,
    "gradlens.compare": 6,
    "gradlens.report": 7,
    "gradlens.cli": 8,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> float:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in STAGES:
            return STAGES[".".join(parts[:n])]
    raise KeyError(module)


def is_module(name: str) -> bool:
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def gradlens_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, imported module, imported names)`` of every gradlens import in a file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "gradlens"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gradlens":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((node.lineno, sub, []) if is_module(sub) else (node.lineno, node.module, [a.name]))
    return out


FILES = sorted(ROOT.rglob("*.py"))


def test_every_module_has_a_stage() -> None:
    missing = [module_name(f) for f in FILES if not any(module_name(f) == k or module_name(f).startswith(k + ".")
                                                         for k in STAGES if k != "gradlens")]
    assert not [m for m in missing if m != "gradlens"], f"modules without a stage in STAGES: {missing}"


def test_imports_flow_from_earlier_stages_only() -> None:
    bad = []
    for f in FILES:
        me = module_name(f)
        for line, target, _ in gradlens_imports(f):
            if stage(target) > stage(me):
                bad.append(f"{f.relative_to(ROOT.parent)}:{line}: {me} (stage {stage(me)}) imports {target} "
                           f"(stage {stage(target)})")
    assert not bad, "imports against the stage order:\n" + "\n".join(bad)


def test_no_private_name_is_imported_across_modules() -> None:
    bad = [f"{f.relative_to(ROOT.parent)}:{line}: imports {target}.{name}"
           for f in FILES for line, target, names in gradlens_imports(f) for name in names
           if name.startswith("_") and not name.startswith("__")]
    bad += [f"{f.relative_to(ROOT.parent)}:{line}: imports private module {target}"
            for f in FILES for line, target, _ in gradlens_imports(f)
            if any(p.startswith("_") and not p.startswith("__") for p in target.split("."))]
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_no_module_level_import_cycle() -> None:
    """Module-level imports (the ones that run at import time) form no cycle."""
    graph: dict[str, set[str]] = {}
    for f in FILES:
        tree = ast.parse(f.read_text())
        deps = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gradlens"):
                deps |= {f"{node.module}.{a.name}" if is_module(f"{node.module}.{a.name}") else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("gradlens")}
        graph[module_name(f)] = deps - {module_name(f)}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join([*trail[trail.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*trail, dep])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_the_stage_test_catches_a_backward_import(tmp_path: Path) -> None:
    """The rule can fail: a leaf importing the compare stage is reported."""
    leaf = tmp_path / "leaf.py"
    leaf.write_text("from gradlens.compare.protocol import compare\n")
    (line, target, names), = gradlens_imports(leaf)
    assert (target, stage(target)) == ("gradlens.compare.protocol", 6) and stage("gradlens.fsio") == 0


def test_a_type_checking_import_counts_as_an_edge(tmp_path: Path) -> None:
    """An import under ``if TYPE_CHECKING:`` is an edge too (it says what the module needs), so it is checked."""
    leaf = tmp_path / "leaf.py"
    leaf.write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
                    "    from gradlens.analysis.result import AnalysisResult\n")
    (line, target, names), = gradlens_imports(leaf)
    assert (line, target, names, stage(target)) == (4, "gradlens.analysis.result", ["AnalysisResult"], 4)


# Imports groups of modules in order (a JSON list of lists on the command line) and prints, after each group, every
# gradlens module the interpreter then holds.
LOADED = """import importlib, json, sys
snapshots = []
for group in json.loads(sys.argv[1]):
    for name in group:
        importlib.import_module(name)
    snapshots.append(sorted(m for m in sys.modules if m.split(".")[0] == "gradlens"))
print(json.dumps(snapshots))
"""


def loaded_after(groups: list[list[str]], path: Path | None = None) -> list[list[str]]:
    """The gradlens modules a fresh interpreter has loaded after importing each of ``groups`` in turn (``path``:
    prepended to ``PYTHONPATH``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", LOADED, json.dumps(groups)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, f"importing {groups} failed:\n{out.stderr}"
    return json.loads(out.stdout)


def later_than(level: float, loaded: list[str]) -> list[str]:
    return [m for m in loaded if stage(m) > level]


def test_a_fresh_interpreter_loads_no_later_stage() -> None:
    """What runs, not only what the source says: a fresh interpreter imports the stages in order, and after each
    one holds nothing of a later stage (a package ``__init__`` importing eagerly, a chain of imports). Importing the
    stages one after another finds exactly what one interpreter per stage would: what is loaded after stage s is
    what the modules of stages <= s load. A stage that fails is then imported module by module, to name the
    culprit."""
    by_stage: dict[float, list[str]] = {}
    for f in FILES:
        by_stage.setdefault(stage(module_name(f)), []).append(module_name(f))
    levels = sorted(by_stage)
    snapshots = loaded_after([by_stage[level] for level in levels])
    bad = [f"stage {level}: {m} loads {later_than(level, loaded)}"
           for level, after in zip(levels, snapshots, strict=True) if later_than(level, after)
           for m in by_stage[level] if later_than(level, loaded := loaded_after([[m]])[0])]
    assert not bad, "imports that load a later stage:\n" + "\n".join(bad)


def test_the_fresh_interpreter_check_catches_a_later_load(tmp_path: Path) -> None:
    """The rule can fail: a module of the leaf stage whose import loads the compare stage is reported."""
    (tmp_path / "leaf_probe.py").write_text("import gradlens.compare.tables\n")
    before, after = loaded_after([["gradlens.fsio"], ["leaf_probe"]], tmp_path)
    assert not later_than(0, before) and "gradlens.compare.tables" in later_than(0, after)


def test_the_store_writer_loads_no_analysis() -> None:
    """Recording writes through the store, which needs only the statistics leaves: never the analysis layer."""
    (loaded,) = loaded_after([["gradlens.store.writer"]])
    assert "gradlens.stats.streaming" in loaded and "gradlens.stats.device" in loaded
    assert not [m for m in loaded if m.startswith("gradlens.analysis") or stage(m) > 2], loaded


@pytest.mark.parametrize("code", [
    "import gradlens",
    "import gradlens.report",
    "import gradlens.config, gradlens.budget, gradlens.compare.tables",
    "from gradlens.cli.main import build_parser; build_parser().format_help()",
])
def test_entry_points_do_not_import_torch(code: str) -> None:
    probe = f"import sys; {code}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", f"{code!r} imports torch"


def test_every_lazy_export_resolves() -> None:
    """Each package's lazily exported names point at modules that define them (a moved function breaks this)."""
    packages = sorted(module_name(f) for f in FILES if f.name == "__init__.py" and "__all__" in f.read_text())
    code = ("import importlib, sys\n"
            "for p in sys.argv[1:]:\n"
            "    m = importlib.import_module(p)\n"
            "    missing = [n for n in m.__all__ if not hasattr(m, n)]\n"
            "    assert not missing, f'{p}.__all__ names what it does not hold: {missing}'\n")
    out = subprocess.run([sys.executable, "-c", code, *packages], capture_output=True, text=True)
    assert out.returncode == 0 and len(packages) >= 5, out.stderr[-2000:]
