"""The documented commands run in order in a fresh clone (issue 16, item 10): no collisions, every block known.

The full run (minutes, on the default model) is ``python benchmarks/run_docs.py``; this checks its plan.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("run_docs", ROOT / "benchmarks" / "run_docs.py")
run_docs = sys.modules.setdefault("run_docs", importlib.util.module_from_spec(spec))
spec.loader.exec_module(run_docs)


def test_no_documented_command_overwrites_an_earlier_output_or_a_repository_file():
    assert run_docs.planned_outputs() == []


def test_the_checker_sees_a_collision(tmp_path):
    import subprocess

    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("```sh\nllmprobe trace a.txt -o t.parquet\n```\n"
                                        "```sh\nllmprobe plot t.parquet -o kept.png  # a comment\n```\n")
    (tmp_path / "docs" / "x.md").write_text("```\nllmprobe trace b.txt \\\n  -o t.parquet\n```\n"
                                            "<!-- not-run: a GPU -->\n```sh\nllmprobe trace c.txt -o t.parquet\n```\n")
    (tmp_path / "kept.png").write_bytes(b"")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "kept.png"], cwd=tmp_path, check=True)
    problems = run_docs.planned_outputs(tmp_path)
    assert problems == ["README.md:4: kept.png is a file of the repository",
                        "docs/x.md:1: t.parquet was already written at README.md:1"]
    assert [b.skip for b in run_docs.blocks(tmp_path)] == [None, None, None, "a GPU"]


def test_every_runnable_block_is_an_llmprobe_command():
    runnable = [b for b in run_docs.blocks() if not b.skip]
    assert len(runnable) >= 10
    for block in runnable:
        for command in block.commands():
            assert command.split()[0] in ("llmprobe", "printf"), (block.doc, block.line, command)
