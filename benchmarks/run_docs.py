"""Run every documented command, in order, in a fresh clone, as written (issue 16: docs that collide).

Run: python benchmarks/run_docs.py [--list] [--keep] [--from-doc NAME]

The shell blocks of README.md and then docs/*.md (in DOC_ORDER) are extracted and each block runs
with ``bash -euo pipefail`` in a ``git clone`` of the committed HEAD, with ``llmprobe`` on PATH
meaning this interpreter's ``python -m llmprobe`` on the clone. A block is a fenced block (no
language, sh, bash) with a command line; a block right after ``<!-- not-run: REASON -->`` is listed
and skipped (a GPU, a cluster, your own checkpoint), the ``<!-- test-command -->`` block (the whole
test suite) too, and of the ``<!-- main-command -->`` block only the part from the first
``llmprobe`` runs (the install before it is the environment this script runs in). Each block's
time and the total are printed; the exit status is 1 if any block failed.

:func:`planned_outputs` is the fast check tests/test_docs.py runs in the default suite: no
command writes an output that an earlier command (or the clone itself) already holds unless it
passes ``--force``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC_ORDER = ["README.md", "docs/plots.md", "docs/traces.md", "docs/experiments.md", "docs/analyses.md",
             "docs/statistics.md", "docs/guarantees.md", "docs/performance.md", "docs/scale-out.md"]
COMMANDS = ("llmprobe", "printf", "python", "python3", "pip", "ray")
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->")


@dataclass
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    text: str
    skip: str | None  # why it is not run, or None

    def commands(self) -> list[str]:
        """Logical command lines: continuations joined, comments and blanks dropped."""
        joined = re.sub(r"\\\n\s*", " ", self.text)
        lines = [strip_comment(line).strip() for line in joined.splitlines()]
        return [line for line in lines if line]


def strip_comment(line: str) -> str:
    """The line without a trailing ``# comment`` outside quotes."""
    quote, out = None, []
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            break
        out.append(ch)
    return "".join(out)


def documents(root: Path = ROOT) -> list[str]:
    extra = sorted(str(p.relative_to(root)) for p in (root / "docs").glob("*.md") if str(p.relative_to(root))
                   not in DOC_ORDER)
    return [d for d in DOC_ORDER if (root / d).exists()] + extra


def blocks(root: Path = ROOT) -> list[Block]:
    found = []
    for doc in documents(root):
        lines = (root / doc).read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            match = FENCE.match(lines[i])
            if not match:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            language, text = match.group(1), "\n".join(lines[i + 1:end])
            before = "\n".join(lines[max(0, i - 2):i])
            block = Block(doc, i + 1, text, None)
            if language in ("", "sh", "bash") and any(c.split()[0] in COMMANDS for c in block.commands()):
                if "<!-- test-command -->" in before:
                    block.skip = "the whole test suite (run it as the README says)"
                elif NOT_RUN.search(before):
                    block.skip = NOT_RUN.search(before).group(1)
                elif "<!-- main-command -->" in before:
                    block.text = text[text.index("llmprobe "):]
                found.append(block)
            i = end + 1
    return found


def outputs(command: str) -> list[tuple[str, bool]]:
    """The files one command line writes (``-o``/``--output`` of each llmprobe stage), and whether --force."""
    found = []
    for stage in re.split(r"\s(?:\|\||&&|\|)\s", command):
        try:
            words = shlex.split(stage)
        except ValueError:
            continue
        if not words or words[0] != "llmprobe":
            continue
        for flag, value in zip(words, words[1:]):
            if flag in ("-o", "--output") and value != "-":
                found.append((value, "--force" in words))
    return found


def repository_files(root: Path) -> set[str]:
    """The repository's files, relative to ``root``: git's list in a checkout; elsewhere (CI's copy of a checkout,
    a source archive) every file but the environment's and the caches' (dot-directories, __pycache__)."""
    listed = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=False)
    if listed.returncode == 0 and (root / ".git").exists():
        return set(listed.stdout.split())
    found = set()
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".") and d != "__pycache__"]
        found.update(str((Path(directory) / f).relative_to(root)) for f in files)
    return found


def planned_outputs(root: Path = ROOT) -> list[str]:
    """Collisions in the runnable blocks, in order: outputs that would exist already, without --force."""
    tracked = repository_files(root)
    written: dict[str, str] = {}
    problems = []
    for block in blocks(root):
        if block.skip:
            continue
        for command in block.commands():
            for path, force in outputs(command):
                where = f"{block.doc}:{block.line}"
                key = str(Path(path))
                if not force and key in written:
                    problems.append(f"{where}: {path} was already written at {written[key]}")
                elif not force and key in tracked:
                    problems.append(f"{where}: {path} is a file of the repository")
                written[key] = where
    return problems


def fresh_clone(work: Path) -> tuple[Path, dict[str, str]]:
    """A ``git clone`` of the committed HEAD in ``work``, and the environment in which ``llmprobe`` means this
    interpreter's ``python -m llmprobe`` on the clone."""
    clone = work / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    shim = work / "bin"
    shim.mkdir()
    (shim / "llmprobe").write_text(f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(clone))} exec "
                                   f"{shlex.quote(sys.executable)} -m llmprobe \"$@\"\n")
    (shim / "llmprobe").chmod(0o755)
    return clone, {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"}


def run(keep: bool, start_doc: str | None) -> int:
    work = Path(tempfile.mkdtemp(prefix="llmprobe-docs-"))
    clone, env = fresh_clone(work)
    failed, started = 0, time.perf_counter()
    todo = blocks(clone)
    if start_doc:
        todo = todo[next(i for i, b in enumerate(todo) if b.doc == start_doc):]
    for block in todo:
        if block.skip:
            print(f"SKIP {block.doc}:{block.line}  ({block.skip})", flush=True)
            continue
        t0 = time.perf_counter()
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=clone, env=env,
                                capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        status = "ok  " if result.returncode == 0 else "FAIL"
        print(f"{status} {block.doc}:{block.line}  {seconds:7.1f} s  {block.commands()[0][:90]}", flush=True)
        if result.returncode:
            failed += 1
            print("     " + "\n     ".join(result.stderr.strip().splitlines()[-5:]), flush=True)
    print(f"{len([b for b in todo if not b.skip])} blocks run, {failed} failed, "
          f"{sum(1 for b in todo if b.skip)} skipped, {time.perf_counter() - started:.0f} s in all"
          + (f"; clone kept in {clone}" if keep else ""))
    if not keep:
        subprocess.run(["rm", "-rf", str(work)])
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the blocks and planned collisions only")
    parser.add_argument("--keep", action="store_true", help="keep the clone with its outputs")
    parser.add_argument("--from-doc", help="start at this document (e.g. docs/analyses.md)")
    args = parser.parse_args()
    if args.list:
        for block in blocks():
            print(f"{'SKIP' if block.skip else 'run '} {block.doc}:{block.line}  {block.commands()[0][:90]}")
        for problem in planned_outputs():
            print("COLLISION", problem)
        return
    sys.exit(run(args.keep, args.from_doc))


if __name__ == "__main__":
    main()
