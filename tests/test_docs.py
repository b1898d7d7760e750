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


def test_the_checker_reads_a_copy_without_git(tmp_path):
    """CI runs the suite in a copy of the checkout (no .git): the repository's files are then the files there."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("```sh\nllmprobe plot t.parquet -o docs/kept.png\n```\n")
    (tmp_path / "docs" / "kept.png").write_bytes(b"")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "t.parquet").write_bytes(b"")
    assert run_docs.repository_files(tmp_path) == {"README.md", "docs/kept.png"}
    assert run_docs.planned_outputs(tmp_path) == ["README.md:1: docs/kept.png is a file of the repository"]


def test_every_runnable_block_is_an_llmprobe_command():
    runnable = [b for b in run_docs.blocks() if not b.skip]
    assert len(runnable) >= 10
    for block in runnable:
        for command in block.commands():
            assert command.split()[0] in ("llmprobe", "printf"), (block.doc, block.line, command)


# ------------------------------------------------------------------------------------------ docs/traces.md
def documented_columns(text: str) -> list[tuple[str, str]]:
    """(column, type) rows of docs/traces.md's Columns table; a row naming two columns gives two rows."""
    section = text.split("## Columns", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = [n.strip().strip("`") for n in cells[0].split(",")]
        types = [t.strip() for t in cells[1].split(",")]
        rows += zip(names, types if len(types) == len(names) else types * len(names))
    return rows


def arrow_type_name(field) -> str:
    """The schema's type as the docs spell it: int32, string, dictionary string, fixed_size_list<int32>[k]."""
    import pyarrow as pa

    def plain(t) -> str:
        return {"halffloat": "float16", "float": "float32", "double": "float64"}.get(str(t), str(t))

    t = field.type
    if pa.types.is_dictionary(t):
        return f"dictionary {plain(t.value_type)}"
    if pa.types.is_fixed_size_list(t):
        size = {"topk_ids": "k", "topk_logprobs": "k", "embedding": "d"}.get(field.name, "n")
        return f"fixed_size_list<{plain(t.value_type)}>[{size}]"
    return plain(t)


def test_the_documented_columns_are_the_schema():
    """Every column of the fullest trace (logit lens, targets, embeddings) is documented, in order, with
    its type; no documented column is missing from the schema."""
    from llmprobe.tracing.schema import trace_schema

    schema = trace_schema(top_k=5, n_targets=2, layers=True, embedding_dim=4)
    documented = documented_columns((ROOT / "docs" / "traces.md").read_text(encoding="utf-8"))
    assert [name for name, _ in documented] == schema.names
    for (name, spelled), field in zip(documented, schema):
        assert spelled.replace("string (JSON)", "string") == arrow_type_name(field), name


def test_the_column_check_sees_a_missing_or_mistyped_column():
    text = ("## Columns\n\n| column | type | meaning |\n|---|---|---|\n| `prompt_index` | int32 | x |\n"
            "| `token_id`, `token` | int32, string | y |\n| `entropy` | float64 | z |\n\n## Next\n| `no` | int8 | - |\n")
    assert documented_columns(text) == [("prompt_index", "int32"), ("token_id", "int32"), ("token", "string"),
                                        ("entropy", "float64")]
