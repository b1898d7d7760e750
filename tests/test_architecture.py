"""The package's dependency rules, checked on the source by an AST walk (no module is imported).

Rules (docs/design.md explains each):

* ``llmprobe.bayes`` imports only the standard library, numpy, scipy and itself;
* nothing outside ``llmprobe.cli`` imports ``llmprobe.cli`` (``python -m llmprobe`` excepted);
* torch, transformers, accelerate, safetensors, tokenizers and gguf only in ``llmprobe.model``,
  ``llmprobe.tracing`` and ``llmprobe.control``, plus one import inside a function of
  ``llmprobe.analysis.martingale`` (it samples from a model);
* matplotlib only in ``llmprobe.plots``; rich and typer only in ``llmprobe.cli``;
* no import circle between llmprobe modules, counting imports inside functions too;
* files are renamed into place only by ``llmprobe.files`` (and the trace checkpoint directory,
  which commits parts with its own documented renames);
* torch hooks are attached to a model only in ``llmprobe.tracing.hooks``, and the trace engine
  (``Tracer``) is built only by ``llmprobe.tracing.run`` (``TraceRun``), exactly once.

Every rule is also run against a small planted package that breaks it, so the checker is known to fail.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "llmprobe"
MODEL_LIBRARIES = {"torch", "transformers", "accelerate", "safetensors", "tokenizers", "gguf"}
MODEL_ROOMS = ("llmprobe.model", "llmprobe.tracing", "llmprobe.control")
LAZY_MODEL_USERS = {"llmprobe.analysis.martingale"}
RENAMING_CALLS = {("os", "replace"), ("os", "rename"), ("tempfile", "mkstemp"), ("tempfile", "mkdtemp")}
RENAMING_MODULES = {"llmprobe.files", "llmprobe.tracing.checkpoint"}
HOOK_CALLS = {"register_forward_hook", "register_forward_pre_hook"}
HOOK_MODULE = "llmprobe.tracing.hooks"
ENGINE_BUILDER = "llmprobe.tracing.run"
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module, absolute
    lazy: bool  # inside a function


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> list[Import]:
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(name, alias.name, lazy) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                found.append(Import(name, base, lazy))
                # `from llmprobe.cli import views` imports the submodule llmprobe.cli.views
                found.extend(Import(name, f"{base}.{alias.name}", lazy) for alias in child.names
                             if (root.parent / Path(*f"{base}.{alias.name}".split("."))).with_suffix(".py").exists())
            visit(child, inner)

    visit(tree, False)
    return found


def renaming_calls(path: Path) -> list[str]:
    """``os.replace(...)``, ``tempfile.mkstemp(...)``, ... called in the file."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name) and (node.func.value.id, node.func.attr) in RENAMING_CALLS:
            calls.append(f"{node.func.value.id}.{node.func.attr} (line {node.lineno})")
    return calls


def calls_named(path: Path, names: set[str]) -> list[str]:
    """Calls of a function or method with one of ``names`` (``x.register_forward_hook(...)``, ``Tracer(...)``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in names:
                found.append(f"{name} (line {node.lineno})")
    return found


def inside(module: str, *rooms: str) -> bool:
    return any(module == room or module.startswith(room + ".") for room in rooms)


def violations(root: Path) -> list[str]:
    """Every broken rule in the package at ``root``, one line each."""
    files = sorted(root.rglob("*.py"))
    edges = [imp for path in files for imp in imports_of(path, root)]
    problems = []
    for imp in edges:
        top = imp.target.split(".")[0]
        if inside(imp.module, "llmprobe.bayes") and not (top in STDLIB | {"numpy", "scipy"}
                                                         or inside(imp.target, "llmprobe.bayes")):
            problems.append(f"{imp.module} imports {imp.target}: bayes uses numpy/scipy only")
        if inside(imp.target, "llmprobe.cli") and not inside(imp.module, "llmprobe.cli", "llmprobe.__main__"):
            problems.append(f"{imp.module} imports {imp.target}: nothing outside cli imports cli")
        if top in MODEL_LIBRARIES and not inside(imp.module, *MODEL_ROOMS) \
                and not (imp.module in LAZY_MODEL_USERS and imp.lazy):
            problems.append(f"{imp.module} imports {imp.target}: model libraries only in model/, tracing/, control/")
        if top == "matplotlib" and not inside(imp.module, "llmprobe.plots"):
            problems.append(f"{imp.module} imports {imp.target}: matplotlib only in plots/")
        if top in ("rich", "typer") and not inside(imp.module, "llmprobe.cli"):
            problems.append(f"{imp.module} imports {imp.target}: {top} only in cli/")
    for path in files:
        name = module_name(path, root)
        if name not in RENAMING_MODULES:
            problems += [f"{name} calls {call}: files are written through llmprobe.files" for call in renaming_calls(path)]
        if name != HOOK_MODULE:
            problems += [f"{name} calls {call}: hooks are attached in {HOOK_MODULE}"
                         for call in calls_named(path, HOOK_CALLS)]
        if name != ENGINE_BUILDER:
            problems += [f"{name} builds {call}: the engine is built by {ENGINE_BUILDER} (TraceRun)"
                         for call in calls_named(path, {"Tracer"})]
    problems += [f"import circle: {' -> '.join(cycle)}" for cycle in import_cycles(edges)]
    return problems


def import_cycles(edges: list[Import]) -> list[list[str]]:
    """One representative path for each circle between llmprobe modules (package __init__ files count)."""
    graph: dict[str, set[str]] = {}
    for imp in edges:
        if inside(imp.target, "llmprobe") and imp.target != imp.module and not imp.module.startswith(imp.target + "."):
            graph.setdefault(imp.module, set()).add(imp.target)
    cycles, state = [], {}

    def walk(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            walk(start, [start])
    return cycles


def test_llmprobe_keeps_its_dependency_rules():
    assert violations(PACKAGE_ROOT) == []


def test_the_engine_is_built_in_exactly_one_place():
    builds = {module_name(path, PACKAGE_ROOT): calls_named(path, {"Tracer"}) for path in PACKAGE_ROOT.rglob("*.py")}
    builds = {name: calls for name, calls in builds.items() if calls}
    assert list(builds) == [ENGINE_BUILDER] and len(builds[ENGINE_BUILDER]) == 1, builds


PLANTED = {
    "bayes/__init__.py": "import torch\n",
    "analysis/__init__.py": "",
    "analysis/stats.py": "from llmprobe.cli import output\nimport matplotlib\n",
    "analysis/martingale.py": "import torch\ndef sample():\n    import transformers\n",
    "tracing/__init__.py": "",
    "tracing/a.py": "from llmprobe.tracing import b\n",
    "tracing/b.py": "def later():\n    from llmprobe.tracing.a import x\n",
    "tracing/writer.py": "import os\ndef save(t, p):\n    os.replace(t, p)\n",
    "tracing/lens.py": "def probe(model):\n    model.register_forward_pre_hook(print)\n",
    "api.py": "def trace(loaded, settings):\n    return Tracer(loaded, settings)\n",
    "plots/__init__.py": "import rich\n",
    "cli/__init__.py": "",
    "cli/output.py": "import rich\nimport typer\n",
}


def test_the_checker_fails_on_a_package_that_breaks_each_rule(tmp_path):
    root = tmp_path / "llmprobe"
    for name, text in PLANTED.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "__init__.py").write_text("")
    found = violations(root)
    expected = [
        "llmprobe.bayes imports torch: bayes uses numpy/scipy only",
        "llmprobe.bayes imports torch: model libraries only in",
        "llmprobe.analysis.stats imports llmprobe.cli: nothing outside cli imports cli",
        "llmprobe.analysis.stats imports llmprobe.cli.output: nothing outside cli imports cli",
        "llmprobe.analysis.stats imports matplotlib: matplotlib only in plots/",
        "llmprobe.analysis.martingale imports torch: model libraries only in",
        "llmprobe.plots imports rich: rich only in cli/",
        "llmprobe.tracing.writer calls os.replace (line 3)",
        "llmprobe.tracing.lens calls register_forward_pre_hook (line 2): hooks are attached in",
        "llmprobe.api builds Tracer (line 2): the engine is built by llmprobe.tracing.run",
        "import circle: llmprobe.tracing.a -> llmprobe.tracing.b -> llmprobe.tracing.a",
    ]
    for needle in expected:
        assert any(line.startswith(needle) for line in found), (needle, found)
    # the lazy model import in martingale and rich/typer inside cli are allowed
    assert not any("transformers" in line for line in found)
    assert not any(line.startswith("llmprobe.cli.output") for line in found)
    assert len(found) == len(expected)


@pytest.mark.parametrize("module", ["llmprobe.bayes", "llmprobe.analysis.fits", "llmprobe.analysis.continuity",
                                    "llmprobe.tracing.reader", "llmprobe.files"])
def test_light_modules_load_without_model_libraries(module):
    """Importing the statistics or the reader never drags torch or matplotlib in (a fresh interpreter)."""
    import subprocess

    code = (f"import sys, {module}; heavy = sorted(m for m in ('torch', 'transformers', 'matplotlib', 'rich')"
            " if m in sys.modules); print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
