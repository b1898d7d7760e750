"""What a writer killed mid-write leaves beside its output (issue 26: state that outlives a run).

Every output is built in a hidden ``.NAME.*.partial`` file or directory beside it (:mod:`llmprobe.files`).
SIGKILL leaves it behind; the next write of the same output removes it — but never the one a live writer
is still filling, whose lock (``flock``) tells the two apart. Writers here are real processes, killed with
SIGKILL mid-write.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from llmprobe.files import STALE_AFTER_SECONDS, atomic_dir
from tests.cli.fault_fixtures import COIN, REPO
from tests.cli_helpers import run_cli

pytest.importorskip("fcntl")

WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from llmprobe.files import atomic_dir, atomic_file
    output, kind = Path(sys.argv[1]), sys.argv[2]
    if kind == "file":
        with atomic_file(output, "w", replace=True) as stream:
            stream.write("written by the slow writer")
            stream.flush()
            print("ready", flush=True)
            sys.stdin.readline()  # until told to finish (or killed)
    else:
        with atomic_dir(output) as staging:
            (staging / "part-0.parquet").write_text("a part")
            print("ready", flush=True)
            sys.stdin.readline()
""")


def writer(output: Path, kind: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(output), kind], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def partials(output: Path) -> set[Path]:
    return set(output.parent.glob(f".{output.name}.*.partial"))


def age(paths: set[Path]) -> None:
    """As if written a while ago: only the lock may tell a live writer's file from a leftover now."""
    old = time.time() - 2 * STALE_AFTER_SECONDS
    for path in paths:
        os.utime(path, (old, old))


def test_a_killed_writers_partial_is_removed_by_the_next_write_and_a_live_writers_is_kept(tmp_path, capsys,
                                                                                         monkeypatch):
    output = tmp_path / "prompts.jsonl"
    killed = writer(output, "file")
    killed.kill()
    killed.wait(timeout=30)
    leftover = partials(output)
    assert len(leftover) == 1
    live = writer(output, "file")
    filling = partials(output) - leftover
    age(leftover | filling)
    code, _, err = run_cli(["experiment", str(COIN), "--n-max", "2", "--sequences", "1", "-o", str(output), "--force",
                            "-q"], capsys, monkeypatch)
    assert code == 0, err
    assert partials(output) == filling  # the leftover is gone; the live writer's file is untouched
    out, err = live.communicate("finish\n", timeout=60)
    assert live.returncode == 0, err
    assert output.read_text() == "written by the slow writer" and partials(output) == set()


def test_a_killed_writers_staging_directory_is_removed_by_the_next_write_and_a_live_writers_is_kept(tmp_path):
    """The staging directories of atomic_dir: a Ray trace's part files, a wind-tunnel checkpoint."""
    output = tmp_path / "coin-control"
    killed = writer(output, "dir")
    killed.kill()
    killed.wait(timeout=30)
    leftover = partials(output)
    live = writer(output, "dir")
    filling = partials(output) - leftover
    assert len(leftover) == 1 and len(filling) == 1
    age(leftover | filling)
    with atomic_dir(output) as staging:
        (staging / "config.json").write_text("{}")
    assert partials(output) == filling and (output / "config.json").is_file()
    _, err = live.communicate("finish\n", timeout=60)
    assert live.returncode == 0, err
    assert sorted(p.name for p in output.iterdir()) == ["part-0.parquet"] and partials(output) == set()
