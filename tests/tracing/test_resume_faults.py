"""Resume under damage: a deleted manifest, a truncated or missing committed part (checked before any
recomputation, and only its window traced again), a merge killed by SIGKILL (its hidden ``.partial``
removed by the resume), ``--resume`` over a complete output, and a second run while the first holds
the lock.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest

import llmprobe.tracing.run

from llmprobe.tracing.checkpoint import work_dir_for
from tests.cli.fault_fixtures import REPO, flip_a_byte_in_pages
from tests.tracing.test_resume import (assert_same_trace, committed, interrupt_after, one_line_error,
                                       record_batches, run_cli)

pytestmark = pytest.mark.usefixtures("one_thread")

# The `small` fixture of test_resume: 20 prompts, 3 per batch, windows of 2 batches (6, 6, 6, 2 prompts).
from tests.tracing.test_resume import small, small_reference  # noqa: E402,F401  (fixtures)


def interrupted_run(args, output, capsys, monkeypatch, batches: int) -> None:
    with monkeypatch.context() as m:
        interrupt_after(m, batches)
        code, err = run_cli(args(output), capsys, monkeypatch)
    assert code == 130, err
    assert len(committed(output)) == batches


def test_a_deleted_manifest_is_one_line(small, tmp_path, capsys, monkeypatch):
    _, args = small
    output = tmp_path / "out.parquet"
    interrupted_run(args, output, capsys, monkeypatch, 3)
    (work_dir_for(str(output)) / "manifest.jsonl").unlink()
    one_line_error(*run_cli(args(output, "--resume"), capsys, monkeypatch), "no manifest", "--force")
    code, err = run_cli(args(output, "--force"), capsys, monkeypatch)
    assert code == 0, err


@pytest.mark.parametrize("damage", ["truncated", "missing", "bit rot", "flipped byte, footer intact"])
def test_a_damaged_part_is_found_first_and_only_its_window_is_traced_again(damage, small, small_reference, tmp_path,
                                                                           capsys, monkeypatch):
    _, args = small
    output = tmp_path / "out.parquet"
    interrupted_run(args, output, capsys, monkeypatch, 5)  # windows 0 and 1 done, half of window 2
    part = work_dir_for(str(output)) / "part-00001.parquet"  # the second batch of window 0
    damaged_prompts = set(committed(output)[1]["prompts"])
    if damage == "truncated":
        part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    elif damage == "missing":
        part.unlink()
    elif damage.startswith("flipped"):  # issue 26 item 3: the footer check passed it, the merge then refused it
        flip_a_byte_in_pages(part, "topk_logprobs")
    else:
        part.write_bytes(b"bit rot")
    batches = record_batches(monkeypatch)
    code, err = run_cli(args(output, "--resume"), capsys, monkeypatch)
    assert code == 0, err
    traced = {i for batch in batches for i in batch}
    assert damaged_prompts <= traced
    assert traced.isdisjoint(range(6, 12))  # window 1 was complete: not traced again
    assert_same_trace(output, small_reference)  # same rows in the same order as an uninterrupted run


def test_a_merge_killed_by_sigkill_leaves_a_partial_that_the_resume_removes(small, small_reference, tiny_model_dir,
                                                                            tmp_path, capsys, monkeypatch):
    """A real SIGKILL, sent by the process to itself after the merge wrote its first part."""
    prompts, args = small
    output = tmp_path / "out.parquet"
    script = textwrap.dedent(f"""
        import os, signal, sys
        import llmprobe.tracing.settings, llmprobe.tracing.checkpoint as checkpoint
        llmprobe.tracing.settings.SORT_WINDOW_BATCHES = 2
        tables = checkpoint.WorkDir.tables
        def killed_midway(self, *a, **k):
            for i, table in enumerate(tables(self, *a, **k)):
                if i == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield table
        checkpoint.WorkDir.tables = killed_midway
        from llmprobe.cli import main
        main({args(output)!r})
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "LLMPROBE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()
    partials = list(tmp_path.glob(".out.parquet.*.partial"))
    assert len(partials) == 1 and partials[0].stat().st_size > 0 and not output.exists()
    code, err = run_cli(args(output, "--resume"), capsys, monkeypatch)
    assert code == 0, err
    assert list(tmp_path.glob(".out.parquet*")) == []
    assert_same_trace(output, small_reference)


def test_a_part_that_rots_after_the_resume_checked_it_fails_the_merge_in_one_line_and_the_next_resume_recovers(
        small, small_reference, tmp_path, capsys, monkeypatch):
    """Issue 26 item 3: bit rot found only by the merge is one line that says --resume retraces the part (not a
    run-on 'rerun with --force ... resume with'), and that resume does: every --resume used to fail the same way."""
    _, args = small
    output = tmp_path / "out.parquet"
    interrupted_run(args, output, capsys, monkeypatch, 3)
    part = work_dir_for(str(output)) / "part-00000.parquet"
    check = llmprobe.tracing.run.check_finite

    def rot_then_check(batch, records):  # during the resumed run, after its check of the committed parts
        if part.exists() and not rotted:
            flip_a_byte_in_pages(part, "topk_logprobs")
            rotted.append(part)
        check(batch, records)

    rotted: list = []
    with monkeypatch.context() as m:
        m.setattr(llmprobe.tracing.run, "check_finite", rot_then_check)
        line = one_line_error(*run_cli(args(output, "--resume"), capsys, monkeypatch), "part-00000.parquet",
                              "resume with:")
    assert rotted and "--force" not in line and not output.exists()
    code, err = run_cli(args(output, "--resume"), capsys, monkeypatch)
    assert code == 0, err
    assert_same_trace(output, small_reference)


def test_resume_over_a_complete_output_says_so_and_exits_0(small, small_reference, tmp_path, capsys, monkeypatch):
    _, args = small
    finished = small_reference.read_bytes()
    code, err = run_cli([a for a in args(small_reference, "--resume") if a != "-q"], capsys, monkeypatch)
    assert code == 0 and "is complete: no interrupted run to resume" in " ".join(err.split()), err
    assert small_reference.read_bytes() == finished


def test_a_second_run_is_told_another_run_is_writing(small, tmp_path, capsys, monkeypatch):
    fcntl = pytest.importorskip("fcntl")
    _, args = small
    output = tmp_path / "out.parquet"
    interrupted_run(args, output, capsys, monkeypatch, 2)
    with open(work_dir_for(str(output)) / "lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running trace holds
        for extra in ((), ("--resume",), ("--force",)):
            line = one_line_error(*run_cli(args(output, *extra), capsys, monkeypatch), "another llmprobe trace",
                                  "right now")
            assert "interrupted" not in line
    assert len(committed(output)) == 2 and not output.exists()
    code, err = run_cli(args(output, "--resume"), capsys, monkeypatch)
    assert code == 0, err
    assert pq.read_metadata(output).num_rows > 0


def test_an_unexpected_error_mid_run_is_one_line_that_says_how_to_resume(small, small_reference, tmp_path, capsys,
                                                                         monkeypatch):
    """Say CUDA ran out of memory or a driver failed: one line, the work kept, the resume command given."""
    import llmprobe.tracing.run

    _, args = small
    output = tmp_path / "out.parquet"
    check = llmprobe.tracing.run.check_finite
    calls = []

    def failing(batch, records):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        check(batch, records)

    with monkeypatch.context() as m:
        m.setattr(llmprobe.tracing.run, "check_finite", failing)
        code, err = run_cli(args(output), capsys, monkeypatch)
    assert code == 1
    line = one_line_error(code, err, "unexpected RuntimeError", "LLMPROBE_DEBUG=1", "6 of 20 prompts are saved")
    assert "resume with:" in line and "--resume" in line
    code, err = run_cli(args(output, "--resume"), capsys, monkeypatch)
    assert code == 0, err
    assert_same_trace(output, small_reference)
