"""The package's dependency rules, checked on the source by an AST walk (no module is imported).

Rules (docs/design.md explains each):

* ``llmprobe.bayes`` imports only the standard library, numpy, scipy and itself;
* ``llmprobe.experiments`` imports only the standard library (and tomli, tomllib's backport), numpy,
  ``llmprobe.errors`` and itself;
* nothing outside ``llmprobe.cli`` imports ``llmprobe.cli`` (``python -m llmprobe`` excepted);
* torch, transformers, accelerate, safetensors, tokenizers and gguf only in ``llmprobe.model``,
  ``llmprobe.tracing`` and ``llmprobe.control``, plus one import inside a function of
  ``llmprobe.analysis.martingale`` (it samples from a model);
* matplotlib only in ``llmprobe.plots``; rich and typer only in ``llmprobe.cli``;
* no import circle between llmprobe modules, counting imports inside functions too;
* files are written, renamed and created only by ``llmprobe.files`` (and the trace checkpoint
  directory, which commits parts with its own documented renames): see :func:`write_calls` for the
  spellings that count.
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
WRITING_MODULES = {"llmprobe.files", "llmprobe.tracing.checkpoint"}  # the work directory: documented renames
# What opens, moves or creates files, by qualified name (after resolving the module's import aliases).
OPENERS = {"open", "io.open", "os.fdopen", "codecs.open", "gzip.open", "bz2.open", "lzma.open", "tarfile.open"}
MOVERS = {"os.replace", "os.rename", "os.renames", "os.link", "os.symlink", "shutil.move", "shutil.copy",
          "shutil.copy2", "shutil.copyfile", "shutil.copytree"}
TEMP_MAKERS = {"tempfile.mkstemp", "tempfile.mkdtemp", "tempfile.NamedTemporaryFile", "tempfile.TemporaryFile",
               "tempfile.SpooledTemporaryFile", "tempfile.TemporaryDirectory"}
WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC"}
PATH_WRITERS = {"write_text", "write_bytes", "touch", "symlink_to", "hardlink_to"}  # Path methods, any receiver
# Writers that take a destination (position, keyword): a path makes them open the file themselves.
DESTINATION_FUNCTIONS = {
    "json.dump": (1, "fp"), "pickle.dump": (1, "file"), "marshal.dump": (1, "file"), "numpy.save": (0, "file"),
    "numpy.savez": (0, "file"), "numpy.savez_compressed": (0, "file"), "numpy.savetxt": (0, "fname"),
    "torch.save": (1, "f"), "pyarrow.parquet.write_table": (1, "where"), "pyarrow.parquet.ParquetWriter": (0, "where"),
    "pyarrow.parquet.write_to_dataset": (1, "root_path"), "pyarrow.csv.write_csv": (1, "output_file"),
    "pyarrow.feather.write_feather": (1, "dest"),
}
DESTINATION_METHODS = {
    "to_parquet": (0, "path"), "to_csv": (0, "path_or_buf"), "to_json": (0, "path_or_buf"),
    "to_feather": (0, "path"), "to_pickle": (0, "path"), "savefig": (0, "fname"),
    "save_pretrained": (0, "save_directory"), "write_parquet": (0, "path"), "write_csv": (0, "path"),
    "write_json": (0, "path"),
}
MANAGERS = {"llmprobe.files.atomic_file", "llmprobe.files.atomic_dir"}  # `with ... as NAME`: a stream, a staging dir
MEMORY_STREAMS = {"io.BytesIO", "io.StringIO"}
STANDARD_STREAMS = {"sys.stdout", "sys.stdout.buffer", "sys.stderr", "sys.stderr.buffer"}
STREAM_ANNOTATIONS = {"IO", "BinaryIO", "TextIO", "typing.IO", "typing.BinaryIO", "typing.TextIO"}
UNCHECKED = " to an unchecked destination"  # a path, or a handle files.py did not hand out
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
                # `from llmprobe.cli import options` imports the submodule llmprobe.cli.options: an edge to it
                # (the package's __init__ has run already, as for any submodule); other names are the package's
                submodules = [f"{base}.{alias.name}" for alias in child.names
                              if (root.parent / Path(*f"{base}.{alias.name}".split("."))).with_suffix(".py").exists()
                              or (root.parent / Path(*f"{base}.{alias.name}".split(".")) / "__init__.py").exists()]
                if len(submodules) < len(child.names):
                    found.append(Import(name, base, lazy))
                found.extend(Import(name, target, lazy) for target in submodules)
            visit(child, inner)

    visit(tree, False)
    return found


def import_aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> qualified name for every absolute import in the module (``pq`` -> ``pyarrow.parquet``)."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:  # `import a.b` binds a; `import a.b as c` binds c to a.b
                top = alias.name.split(".")[0]
                aliases[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and not node.level:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def write_calls(path: Path) -> list[tuple[int, str]]:
    """(line, what) for each call in the file that writes, moves or creates a file. The rule, precisely:

    * opening for writing: ``open``, ``io.open``, ``os.fdopen``, ``codecs/gzip/bz2/lzma/tarfile.open`` with a mode
      that is not a string literal free of ``w``, ``a``, ``x`` and ``+`` (no mode: reading); ``X.open(mode)``
      (``Path.open``) with a literal mode holding one of them; ``os.open`` with a write flag. Opening
      ``os.devnull`` is not writing a file;
    * ``X.write_text/write_bytes/touch/symlink_to/hardlink_to(...)``, whatever ``X`` is;
    * moving, linking, copying: ``os.replace/rename/renames/link/symlink``, ``shutil.move/copy/copy2/copyfile/
      copytree``, and ``X.rename(Y)`` / ``X.replace(Y)`` shaped like Path's: one positional argument that is not
      a string literal and no keywords (``str.replace`` takes two; pandas renames with a label or keywords);
    * any ``tempfile`` maker (``mkstemp``, ``mkdtemp``, ``NamedTemporaryFile``, ...);
    * a writer that takes a destination (:data:`DESTINATION_FUNCTIONS`, :data:`DESTINATION_METHODS`: ``json.dump``,
      ``np.save``, ``pq.write_table``, ``to_parquet``, ``savefig``, ``save_pretrained``...) unless the destination
      is provably not a path: a name bound in the same function (or an enclosing one) by ``with
      atomic_file(...) as NAME`` / ``with atomic_dir(...) as NAME`` (also as ``str(NAME)``), or to
      ``io.BytesIO()`` / ``io.StringIO()``, a parameter annotated as a stream (``IO``, ``BinaryIO``, ``TextIO``),
      or ``sys.stdout`` / ``sys.stderr``. Without a destination (``frame.to_csv(index=False)``) it returns data.

    Names are resolved through the module's imports, so ``from os import replace as mv; mv(a, b)`` counts.
    Writing to an already open handle (``stream.write``) is not a new file and does not count: the handle's
    opening does. Removing files and making directories are not writes.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases = import_aliases(tree)
    found: list[tuple[int, str]] = []

    def qualified(node: ast.AST) -> str | None:
        attrs = []
        while isinstance(node, ast.Attribute):
            attrs.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        return ".".join([aliases.get(node.id, node.id), *reversed(attrs)])

    def argument(call: ast.Call, position: int, keyword: str) -> ast.AST | None:
        if len(call.args) > position:
            return call.args[position]
        return next((k.value for k in call.keywords if k.arg == keyword), None)

    def writes_mode(mode: ast.AST | None, *, literal_only: bool) -> bool:
        if isinstance(mode, ast.Constant) and isinstance(mode.value, str):
            return any(c in mode.value for c in "wax+")
        return mode is not None and not literal_only

    def managed(scope: ast.AST) -> set[str]:
        """Names bound in ``scope`` (not in functions nested in it) to files.py's streams or to memory."""
        names, todo = set(), list(ast.iter_child_nodes(scope))
        while todo:
            node = todo.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, (ast.With, ast.AsyncWith)):
                names |= {item.optional_vars.id for item in node.items if isinstance(item.optional_vars, ast.Name)
                          and isinstance(item.context_expr, ast.Call) and qualified(item.context_expr.func) in MANAGERS}
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) \
                    and qualified(node.value.func) in MEMORY_STREAMS:
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            todo.extend(ast.iter_child_nodes(node))
        if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = scope.args.posonlyargs + scope.args.args + scope.args.kwonlyargs
            names |= {a.arg for a in arguments if a.annotation is not None and
                      (qualified(a.annotation.value if isinstance(a.annotation, ast.Subscript) else a.annotation)
                       in STREAM_ANNOTATIONS)}
        return names

    def safe_destination(dest: ast.AST, streams: set[str]) -> bool:
        if isinstance(dest, ast.Call) and qualified(dest.func) in ("str", "os.fspath") and len(dest.args) == 1:
            dest = dest.args[0]
        return (isinstance(dest, ast.Name) and dest.id in streams) or qualified(dest) in STANDARD_STREAMS

    def check(call: ast.Call, streams: set[str]) -> str | None:
        name = qualified(call.func)
        method = call.func.attr if isinstance(call.func, ast.Attribute) else None
        on_devnull = bool(call.args) and qualified(call.args[0]) == "os.devnull"
        if name in OPENERS:
            return f"{name}(mode for writing)" if not on_devnull and writes_mode(argument(call, 1, "mode"),
                                                                                literal_only=False) else None
        if name == "os.open":
            flags = {qualified(n).rpartition(".")[2] for n in ast.walk(call.args[1]) if qualified(n)} \
                if len(call.args) > 1 else set()
            return "os.open(write flags)" if flags & WRITE_FLAGS and not on_devnull else None
        if name in MOVERS or name in TEMP_MAKERS:
            return name
        if name in DESTINATION_FUNCTIONS or method in DESTINATION_METHODS:
            dest = argument(call, *(DESTINATION_FUNCTIONS.get(name) or DESTINATION_METHODS[method]))
            return None if dest is None or safe_destination(dest, streams) else (
                f"{name if name in DESTINATION_FUNCTIONS else '.' + method}{UNCHECKED}")
        if method == "open":
            return ".open(mode for writing)" if writes_mode(argument(call, 0, "mode"), literal_only=True) else None
        if method in PATH_WRITERS:
            return f".{method}"
        if method in ("rename", "replace") and len(call.args) == 1 and not call.keywords \
                and not (isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)):
            return f".{method}"
        return None

    def visit(node: ast.AST, streams: set[str]) -> None:
        for child in ast.iter_child_nodes(node):
            inner = streams | managed(child) if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else streams
            if isinstance(child, ast.Call) and (what := check(child, streams)):
                found.append((child.lineno, what))
            visit(child, inner)

    visit(tree, managed(tree))
    return sorted(found)


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


LAYERS = (
    ("errors", "version"),
    ("progress", "files"),
    ("bayes", "experiments", "model"),
    ("tracing",),
    ("analysis",),
    ("control", "plots"),
    ("compare",),
    ("api",),
    ("viewer",),
    ("cli",),
    ("llmprobe", "__main__"),  # the package itself: the lazy public API
)
"""The house, bottom up: a room imports only itself and rooms on lower floors (docs/design.md)."""
FLOOR = {room: floor for floor, rooms in enumerate(LAYERS) for room in rooms}


def room_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def violations(root: Path) -> list[str]:
    """Every broken rule in the package at ``root``, one line each."""
    files = sorted(root.rglob("*.py"))
    edges = [imp for path in files for imp in imports_of(path, root)]
    problems = []
    for imp in edges:
        top = imp.target.split(".")[0]
        if top == "llmprobe" and room_of(imp.module) != room_of(imp.target):
            here, there = room_of(imp.module), room_of(imp.target)
            if there not in FLOOR or here not in FLOOR:
                problems.append(f"{imp.module} imports {imp.target}: {here if here not in FLOOR else there}"
                                " is on no floor of LAYERS")
            elif FLOOR[there] >= FLOOR[here]:
                problems.append(f"{imp.module} imports {imp.target}: {here} may import only rooms below it")
        if inside(imp.module, "llmprobe.bayes") and not (top in STDLIB | {"numpy", "scipy"}
                                                         or inside(imp.target, "llmprobe.bayes")):
            problems.append(f"{imp.module} imports {imp.target}: bayes uses numpy/scipy only")
        if inside(imp.module, "llmprobe.experiments") and not (top in STDLIB | {"numpy", "tomli"} or inside(
                imp.target, "llmprobe.experiments", "llmprobe.errors")):
            problems.append(f"{imp.module} imports {imp.target}: experiments use numpy and llmprobe.errors only")
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
        if name not in WRITING_MODULES:
            problems += [f"{name} calls {what} (line {line}): files are written through llmprobe.files"
                         for line, what in write_calls(path)]
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
        if inside(imp.target, "llmprobe") and imp.target != imp.module:
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
    "experiments/__init__.py": "from llmprobe.errors import UsageError\nfrom llmprobe.bayes import metrics\n",
    "cli/__init__.py": "",
    "cli/output.py": "import rich\nimport typer\n",
    "tracing/run.py": "from llmprobe import __version__\n",
    "gadgets/__init__.py": "",
    "plots/extra.py": "from llmprobe import gadgets\n",
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
        "llmprobe.analysis.stats imports llmprobe.cli.output: nothing outside cli imports cli",
        "llmprobe.analysis.stats imports llmprobe.cli.output: analysis may import only rooms below it",
        "llmprobe.experiments imports llmprobe.bayes: experiments may import only rooms below it",
        "llmprobe.tracing.run imports llmprobe: tracing may import only rooms below it",
        "llmprobe.plots.extra imports llmprobe.gadgets: gadgets is on no floor of LAYERS",
        "llmprobe.analysis.stats imports matplotlib: matplotlib only in plots/",
        "llmprobe.analysis.martingale imports torch: model libraries only in",
        "llmprobe.plots imports rich: rich only in cli/",
        "llmprobe.experiments imports llmprobe.bayes: experiments use numpy and llmprobe.errors only",
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


# Every spelling of a write, one per line, marked with what write_calls must name; unmarked lines must pass.
PLANTED_WRITES = """\
import io
import json
import os
import shutil
import sys
import tempfile
from os import replace as move_into_place
from pathlib import Path
from typing import IO

import numpy as np
import pyarrow.parquet as pq

from llmprobe.files import atomic_dir, atomic_file


def spellings(path: Path, table, frame, fig, model, data, mode):
    open(path, "w")  # flagged: open(mode for writing)
    open(path, mode="ab")  # flagged: open(mode for writing)
    io.open(path, "x")  # flagged: io.open(mode for writing)
    open(path, mode)  # flagged: open(mode for writing)
    os.fdopen(3, "r+b")  # flagged: os.fdopen(mode for writing)
    path.open("a")  # flagged: .open(mode for writing)
    os.open(path, os.O_WRONLY | os.O_CREAT)  # flagged: os.open(write flags)
    path.write_text("x")  # flagged: .write_text
    Path("x").write_bytes(b"x")  # flagged: .write_bytes
    path.touch()  # flagged: .touch
    os.replace(path, path)  # flagged: os.replace
    move_into_place(path, path)  # flagged: os.replace
    shutil.move(path, path)  # flagged: shutil.move
    path.rename(path.with_suffix(".old"))  # flagged: .rename
    path.replace(path.parent / "x")  # flagged: .replace
    tempfile.mkstemp()  # flagged: tempfile.mkstemp
    tempfile.NamedTemporaryFile()  # flagged: tempfile.NamedTemporaryFile
    np.save(path, data)  # flagged: numpy.save to an unchecked destination
    pq.write_table(table, str(path))  # flagged: pyarrow.parquet.write_table to an unchecked destination
    with open(path, "w") as handle:  # flagged: open(mode for writing)
        json.dump(data, handle)  # flagged: json.dump to an unchecked destination
    frame.to_parquet(path)  # flagged: .to_parquet to an unchecked destination
    fig.savefig("figure.png")  # flagged: .savefig to an unchecked destination
    model.save_pretrained(path)  # flagged: .save_pretrained to an unchecked destination


def allowed(path: Path, table, frame, fig, model, data, stream: IO[bytes]):
    open(path)
    open(path, "rb")
    path.open()
    open(os.devnull, "w")
    os.open(os.devnull, os.O_WRONLY)
    os.open(path, os.O_RDONLY)
    "a-b".replace("-", "+")
    frame.rename("label")
    frame.rename(columns={"a": "b"})
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    frame.to_csv(index=False)
    pq.write_table(table, stream)
    json.dump(data, sys.stdout)
    with atomic_file(path) as out:
        pq.write_table(table, out)
        json.dump(data, out)
    with atomic_dir(path) as staging:
        model.save_pretrained(staging)
        frame.write_parquet(str(staging))

        def later():
            np.save(staging, data)
"""


def test_the_write_rule_names_every_spelling_and_nothing_else(tmp_path):
    planted = tmp_path / "writes.py"
    planted.write_text(PLANTED_WRITES)
    expected = [(number, line.partition("# flagged: ")[2]) for number, line in enumerate(PLANTED_WRITES.splitlines(), 1)
                if "# flagged: " in line]
    assert len(expected) == 24
    assert write_calls(planted) == expected


def test_only_files_py_and_the_work_directory_may_write(tmp_path):
    root = tmp_path / "llmprobe"
    modules = {
        "files.py": "import os\ndef commit(t, p):\n    os.replace(t, p)\n",
        "tracing/checkpoint.py": "import os\ndef commit(t, p):\n    os.replace(t, p)\n",
        "tracing/writer.py": ("import pyarrow.parquet as pq\ndef sink(stream, schema):\n"
                              "    return pq.ParquetWriter(stream, schema)\ndef save(p):\n    p.write_text('')\n"),
        "model/sources.py": "def remember(memo, value):\n    memo.write_text(value)\n",
    }
    for name, text in modules.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert violations(root) == [
        "llmprobe.model.sources calls .write_text (line 2): files are written through llmprobe.files",
        "llmprobe.tracing.writer calls pyarrow.parquet.ParquetWriter to an unchecked destination (line 3): files are"
        " written through llmprobe.files",
        "llmprobe.tracing.writer calls .write_text (line 5): files are written through llmprobe.files",
    ]


@pytest.mark.parametrize("module", ["llmprobe.bayes", "llmprobe.experiments", "llmprobe.analysis.fits",
                                    "llmprobe.analysis.continuity", "llmprobe.tracing.reader", "llmprobe.files"])
def test_light_modules_load_without_model_libraries(module):
    """Importing the statistics or the reader never drags torch or matplotlib in (a fresh interpreter)."""
    import subprocess

    code = (f"import sys, {module}; heavy = sorted(m for m in ('torch', 'transformers', 'matplotlib', 'rich')"
            " if m in sys.modules); print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


# ------------------------------------------------------------------------------------------ private names
def private_imports(root: Path) -> list[str]:
    """``from llmprobe.x import _name`` in any module other than x: a module's private names are its own."""
    found = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            target = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(anchor + ([target] if target else []))
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and target != name:
                    found.append(f"{name} imports {alias.name} from {target} (line {node.lineno})")
    return found


def test_no_module_imports_another_modules_private_names():
    assert private_imports(PACKAGE_ROOT) == []


def test_the_private_name_check_fails_on_a_planted_import(tmp_path):
    root = tmp_path / "llmprobe"
    (root / "bayes").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "bayes" / "__init__.py").write_text("")
    (root / "bayes" / "fit.py").write_text("_Marks = 1\nfrom llmprobe.bayes.fit import _Marks as again\n")
    (root / "bayes" / "updating.py").write_text("from llmprobe.bayes.fit import _Marks, __all__, public\n"
                                                "from .fit import _Positions\n")
    assert private_imports(root) == ["llmprobe.bayes.updating imports _Marks from llmprobe.bayes.fit (line 1)",
                                     "llmprobe.bayes.updating imports _Positions from llmprobe.bayes.fit (line 2)"]


# ------------------------------------------------------------------------------------------ room sizes
MAX_MODULE_LINES = 450
"""A module a newcomer reads in one sitting: past this it holds more than one job (docs/design.md)."""


def long_modules(root: Path) -> list[str]:
    return [f"{module_name(path, root)}: {n} lines" for path in sorted(root.rglob("*.py"))
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]


def test_no_module_is_longer_than_a_sitting(tmp_path):
    assert long_modules(PACKAGE_ROOT) == []
    planted = tmp_path / "llmprobe"
    planted.mkdir()
    (planted / "short.py").write_text("x = 1\n" * MAX_MODULE_LINES)
    (planted / "long.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    assert long_modules(planted) == [f"llmprobe.long: {MAX_MODULE_LINES + 1} lines"]


def test_the_public_names_are_the_lazy_ones():
    import llmprobe

    assert llmprobe.__all__ == ["__version__", *llmprobe._API, *llmprobe._READER]
    assert all(callable(getattr(llmprobe, name)) for name in (*llmprobe._API, *llmprobe._READER))
