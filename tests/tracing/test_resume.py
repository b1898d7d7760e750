"""``trace --resume``: interrupted runs (SIGKILL, SIGINT, SIGTERM, errors) finish with exactly the rows of
an uninterrupted run, and a resume with different prompts or settings is refused.

The subprocess tests run the real ``llmprobe trace`` on the tiny model; the in-process ones interrupt
the run from inside (a patched per-batch check raising KeyboardInterrupt) to reach states on purpose.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import llmprobe.tracing.run
import llmprobe.tracing.settings
from llmprobe.tracing.checkpoint import WorkDir, work_dir_for
from llmprobe.cli import main
from llmprobe.tracing.engine import Tracer
from llmprobe.tracing.reader import read_trace
from tests import cli_helpers

N_PROMPTS = 100  # with --batch-size 2: 50 batches in length-sorting windows of 64 and 36 prompts
WORDS = "the coin came up heads tails then a die showed one two three blick means zorp dax mib".split()


def write_prompts(path: Path, n: int = N_PROMPTS, seed: int = 7) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) + "\n"
                            for _ in range(n)))
    return path


def trace_args(prompts: Path, output: Path, model: Path, *extra: str) -> list[str]:
    return ["trace", str(prompts), "-o", str(output), "--model", str(model), "--device", "cpu", "--batch-size", "2",
            "--top-k", "5", "--targets", " heads, tails", "--max-new-tokens", "2", "-q", *extra]


def subprocess_env(tmp: Path) -> dict[str, str]:
    # One thread: fast for a tiny model, and no fight for the CPU with the test process.
    return {**os.environ, "LLMPROBE_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}


def cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "llmprobe", *args]


def committed(output: Path) -> list[dict]:
    """Manifest lines of committed parts (complete lines only)."""
    try:
        data = (work_dir_for(str(output)) / "manifest.jsonl").read_bytes()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in data.split(b"\n")[1:-1]]


def assert_same_trace(got: Path, expected: Path) -> None:
    """Same rows (also in the same order), same schema, same metadata but for the run's time and command."""
    a, b = pq.read_table(got), pq.read_table(expected)
    assert a.schema.equals(b.schema)
    assert a.num_rows == b.num_rows and a.equals(b)
    pd.testing.assert_frame_equal(read_trace(got), read_trace(expected))
    meta_a, meta_b = (json.loads(t.schema.metadata[b"llmprobe"]) for t in (a, b))
    for key in ("created_utc", "command"):
        meta_a.pop(key), meta_b.pop(key)
    assert meta_a == meta_b


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_prompts(tmp_path_factory.mktemp("resume") / "prompts.txt")


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, prompts, tmp_path_factory) -> Path:
    """The reference: the same command run once without interruption (in this process, also on one thread)."""
    import torch

    tmp = tmp_path_factory.mktemp("reference")
    output = tmp / "reference.parquet"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as m:
        m.setenv("LLMPROBE_CACHE", str(tmp / "cache"))
        torch.set_num_threads(1)
        try:
            main(trace_args(prompts, output, tiny_model_dir))
        finally:
            torch.set_num_threads(threads)
    assert sorted(pq.read_table(output).column("prompt_index").unique().to_pylist()) == list(range(N_PROMPTS))
    return output


def interrupt_when(proc: subprocess.Popen, output: Path, parts: int, extra_sleep: float, sig: int) -> None:
    """Send ``sig`` once ``parts`` parts are committed, plus a little; fail if the run ends first."""
    deadline = time.monotonic() + 240
    while len(committed(output)) < parts:
        if proc.poll() is not None:
            pytest.fail(f"the trace ended (exit {proc.returncode}) before the interruption point:"
                        f" {proc.stderr.read().decode()}")
        assert time.monotonic() < deadline, "the trace made no progress"
        time.sleep(0.002)
    time.sleep(extra_sleep)
    proc.send_signal(sig)


def test_killed_and_interrupted_runs_resume_to_exactly_the_uninterrupted_trace(tiny_model_dir, prompts,
                                                                                uninterrupted, tmp_path):
    """SIGKILL three times at random points, then SIGTERM, then Ctrl-C (SIGINT), each on the resumed run;
    the last resume, with the command the message printed, gives the uninterrupted trace."""
    output = tmp_path / "killed.parquet"
    args = trace_args(prompts, output, tiny_model_dir)
    env = subprocess_env(tmp_path)
    rng = random.Random(20240611)  # fixed kill points: a few parts further each time, at a random moment
    command = cli(args)
    for _attempt in range(3):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        interrupt_when(proc, output, len(committed(output)) + rng.randint(1, 10), rng.uniform(0, 0.05),
                       signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        assert not output.exists() and work_dir_for(str(output)).is_dir()
        command = cli(args + ["--resume"])
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        interrupt_when(proc, output, len(committed(output)) + 4, rng.uniform(0, 0.05), sig)
        _, err = proc.communicate(timeout=60)
        err = err.decode()
        assert proc.returncode == 130, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err  # -q: no progress bar, just the message
        found = re.search(r"interrupted with (\d+) of (\d+) prompts done .* resume with: (.*)$", lines[0])
        assert found, lines[0]
        done = {i for part in committed(output) for i in part["prompts"]}
        assert int(found[1]) == len(done) and int(found[2]) == N_PROMPTS
        resume = shlex.split(found[3])
        assert resume[0] == "llmprobe" and resume[-1] == "--resume" and resume[1:-1] == args
        assert not output.exists()
        command = cli(resume[1:])
    assert len(done) < N_PROMPTS
    finish = subprocess.run(command, env=env, capture_output=True, timeout=300)
    assert finish.returncode == 0, finish.stderr.decode()
    assert not work_dir_for(str(output)).exists()
    assert list(tmp_path.glob(".killed.parquet*")) == []  # no temporary files or work directories left
    assert_same_trace(output, uninterrupted)


# ---------------------------------------------------------------------------------------------- in-process


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def run_cli(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """Exit code and stderr of an in-process run (these tests never read stdout)."""
    code, _, err = cli_helpers.run_cli(args, capsys, monkeypatch)
    return code, err


def interrupt_after(monkeypatch, batches: int) -> None:
    """Ctrl-C arriving while batch number ``batches`` (0-based) is about to be written."""
    check = llmprobe.tracing.run.check_finite
    seen = []

    def check_then_interrupt(batch, records):
        if len(seen) == batches:
            raise KeyboardInterrupt
        seen.append(1)
        check(batch, records)

    monkeypatch.setattr(llmprobe.tracing.run, "check_finite", check_then_interrupt)


def one_line_error(code: int, err: str, *needles: str) -> str:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmprobe: error:") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def small(tiny_model_dir, tmp_path, monkeypatch):
    """20 prompts, 3 per batch, length-sorted in windows of 2 batches: 7 batches, 4 windows (6, 6, 6, 2)."""
    monkeypatch.setattr(llmprobe.tracing.settings, "SORT_WINDOW_BATCHES", 2)
    prompts = write_prompts(tmp_path / "p.txt", n=20, seed=5)  # prompt 6 is in the second window's first batch

    def args(output, *extra):
        return ["trace", str(prompts), "-o", str(output), "--model", str(tiny_model_dir), "--device", "cpu",
                "--batch-size", "3", "--top-k", "3", "-q", *extra]

    return prompts, args


@pytest.fixture
def small_reference(small, tmp_path, capsys, monkeypatch):
    _, args = small
    reference = tmp_path / "ref.parquet"
    code, err = run_cli(args(reference), capsys, monkeypatch)
    assert code == 0, err
    return reference


def record_batches(monkeypatch) -> list[list[int]]:
    """The prompt indices of every batch the engine yields, in order."""
    seen: list[list[int]] = []
    trace = Tracer.trace

    def recording(self, records, *args, **kwargs):
        for batch in trace(self, records, *args, **kwargs):
            seen.append(sorted(set(batch.column("prompt_index").to_pylist())))
            yield batch

    monkeypatch.setattr(Tracer, "trace", recording)
    return seen


def test_interrupt_mid_window_then_resume_matches(small, tmp_path, capsys, monkeypatch):
    """Same rows, and the same batches: a resume restarts at the unfinished window, so padding (which
    can change the last bits of the numbers on some devices) is exactly as in one uninterrupted run."""
    _, args = small
    reference, output = tmp_path / "ref.parquet", tmp_path / "out.parquet"
    batches = record_batches(monkeypatch)
    assert run_cli(args(reference), capsys, monkeypatch)[0] == 0
    uninterrupted = list(batches)
    batches.clear()
    with monkeypatch.context() as m:
        interrupt_after(m, 3)  # the first window (2 batches) and half the second are done
        code, err = run_cli(args(output), capsys, monkeypatch)
    assert code == 130
    one_line_error(code, err, "interrupted with 9 of 20 prompts done", "resume with:")
    assert len(committed(output)) == 3 and not output.exists()
    done = {i for part in committed(output) for i in part["prompts"]}
    assert min(set(range(20)) - done) % 6 != 0  # the first unfinished prompt is not where a window starts
    code, err = run_cli(args(output, "--resume"), capsys, monkeypatch)
    assert code == 0, err
    assert_same_trace(output, reference)
    # first run: batches 0-2 committed (the 4th was computed when Ctrl-C came); resume: the second window again
    assert batches == uninterrupted[:4] + uninterrupted[2:]


def test_crash_leftovers_are_discarded_on_resume(small, small_reference, tmp_path, capsys, monkeypatch):
    """What SIGKILL can leave: a temporary part, a part the manifest does not list, a torn manifest line."""
    _, args = small
    output = tmp_path / "out.parquet"
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        run_cli(args(output), capsys, monkeypatch)
    work = work_dir_for(str(output))
    (work / ".part-00003.parquet.tmp").write_bytes(b"half a part")
    (work / "part-00003.parquet").write_bytes(b"a part whose manifest line never made it")
    with open(work / "manifest.jsonl", "ab") as f:
        f.write(b'{"part": "part-00003.parquet", "prom')
    code, err = run_cli(args(output, "--resume"), capsys, monkeypatch)
    assert code == 0, err
    assert_same_trace(output, small_reference)


def test_a_crash_between_the_final_rename_and_the_cleanup_is_harmless(small, small_reference, tmp_path, capsys,
                                                                      monkeypatch):
    _, args = small
    output = tmp_path / "out.parquet"
    with monkeypatch.context() as m:
        m.setattr(WorkDir, "remove", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
        code, err = run_cli(args(output), capsys, monkeypatch)
    one_line_error(code, err, "interrupted with 20 of 20 prompts done")
    assert output.exists() and work_dir_for(str(output)).exists()
    one_line_error(*run_cli(args(output), capsys, monkeypatch), "interrupted run", "--resume")
    code, err = run_cli(args(output, "--resume"), capsys, monkeypatch)  # merges the same parts again
    assert code == 0, err
    assert not work_dir_for(str(output)).exists()
    assert_same_trace(output, small_reference)


def test_a_resume_whose_batches_differ_still_has_every_prompt_once(small, small_reference, tmp_path, capsys,
                                                                   monkeypatch):
    """With --batch-size auto the batches depend on free memory, so a resume may cut them differently;
    committed prompts are then filtered out of the new batches."""
    _, args = small
    output = tmp_path / "out.parquet"
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        run_cli(args(output), capsys, monkeypatch)
    batches = record_batches(monkeypatch)
    monkeypatch.setattr(Tracer, "_batch_size", lambda self, width: 2)
    code, err = run_cli(args(output, "--resume"), capsys, monkeypatch)
    assert code == 0, err
    traced_again = {i for batch in batches for i in batch}  # from the second window on, cut in twos
    assert all(len(b) <= 2 for b in batches) and len(traced_again) == 20 - 6
    got, expected = read_trace(output), read_trace(small_reference)
    assert got["prompt_index"].value_counts().to_dict() == expected["prompt_index"].value_counts().to_dict()
    pd.testing.assert_frame_equal(got, expected)


def test_jsonl_output_is_resumable_too(small, tmp_path, capsys, monkeypatch):
    _, args = small
    reference, output = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    assert run_cli(args(reference, "--format", "jsonl"), capsys, monkeypatch)[0] == 0
    with monkeypatch.context() as m:
        interrupt_after(m, 4)
        assert run_cli(args(output, "--format", "jsonl"), capsys, monkeypatch)[0] == 130
    code, err = run_cli(args(output, "--format", "jsonl", "--resume"), capsys, monkeypatch)
    assert code == 0, err
    # the rows are identical; the header record (issue 16) differs only in created_utc
    assert output.read_text().splitlines()[1:] == reference.read_text().splitlines()[1:]


def test_a_resume_must_match_the_interrupted_run(small, tmp_path, capsys, monkeypatch):
    prompts, args = small
    output = tmp_path / "out.parquet"
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        assert run_cli(args(output), capsys, monkeypatch)[0] == 130
    work = work_dir_for(str(output))
    one_line_error(*run_cli(args(output), capsys, monkeypatch), "interrupted run", "--resume", "--force")
    one_line_error(*run_cli(args(output, "--resume", "--top-k", "4"), capsys, monkeypatch),
                   "cannot resume", "settings.top_k was 3, now 4")
    one_line_error(*run_cli(args(output, "--resume", "--targets", " heads"), capsys, monkeypatch),
                   "cannot resume", "settings.targets")
    one_line_error(*run_cli(args(output, "--resume", "--format", "csv"), capsys, monkeypatch),
                   "cannot resume", "format")
    original = prompts.read_text()
    prompts.write_text(original.replace("coin", "die", 1))
    one_line_error(*run_cli(args(output, "--resume"), capsys, monkeypatch), "cannot resume", "the prompts differ")
    prompts.write_text(original)
    assert len(committed(output)) == 3 and not output.exists()  # refusals touch nothing
    one_line_error(*run_cli(["trace", str(prompts), "-o", "-", "--resume"], capsys, monkeypatch),
                   "--resume", "stdout")
    code, err = run_cli(args(output, "--force"), capsys, monkeypatch)  # --force starts over
    assert code == 0, err
    assert not work.exists() and pq.read_metadata(output).num_rows > 0
    finished = output.read_bytes()
    code, err = run_cli(args(output, "--resume"), capsys, monkeypatch)  # complete: nothing to resume
    assert code == 0 and output.read_bytes() == finished, err


def test_resume_without_an_interrupted_run_starts_one(small, small_reference, tmp_path, capsys, monkeypatch):
    _, args = small
    output = tmp_path / "out.parquet"
    code, err = run_cli(args(output, "--resume"), capsys, monkeypatch)
    assert code == 0, err
    assert_same_trace(output, small_reference)


def test_a_damaged_manifest_is_reported(small, tmp_path, capsys, monkeypatch):
    """(Damaged parts are traced again: tests/tracing/test_resume_faults.py.)"""
    _, args = small
    output = tmp_path / "out.parquet"
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        run_cli(args(output), capsys, monkeypatch)
    work = work_dir_for(str(output))
    (work / "manifest.jsonl").write_text("not json\n")
    one_line_error(*run_cli(args(output, "--resume"), capsys, monkeypatch), "manifest is damaged")


def test_two_runs_on_one_output_are_refused(small, tmp_path, capsys, monkeypatch):
    fcntl = pytest.importorskip("fcntl")
    _, args = small
    output = tmp_path / "out.parquet"
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        run_cli(args(output), capsys, monkeypatch)
    with open(work_dir_for(str(output)) / "lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running trace holds
        one_line_error(*run_cli(args(output, "--resume"), capsys, monkeypatch), "another llmprobe trace")
    code, err = run_cli(args(output, "--resume"), capsys, monkeypatch)
    assert code == 0, err


def test_a_bad_batch_discards_the_work(small, tmp_path, capsys, monkeypatch):
    """NaN mid-run fails the same way on every try, so nothing is kept to resume."""
    _, args = small
    output = tmp_path / "out.parquet"
    check = llmprobe.tracing.run.check_finite
    calls, poisoned_at = [], {}

    def poisoned(batch, records):
        calls.append(1)
        if len(calls) == 4:
            row = batch.num_rows - 1
            entropy = batch.column("entropy").to_numpy().copy()
            entropy[row] = float("nan")
            batch = batch.set_column(batch.schema.get_field_index("entropy"), "entropy", pa.array(entropy))
            record = records[batch.column("prompt_index")[row].as_py()]
            poisoned_at.update(id=record.id, line=record.line, position=batch.column("position")[row].as_py())
        check(batch, records)

    monkeypatch.setattr(llmprobe.tracing.run, "check_finite", poisoned)
    code, err = run_cli(args(output), capsys, monkeypatch)
    one_line_error(code, err, "entropy is NaN or infinite", f"position {poisoned_at['position']}",
                   f"prompt {poisoned_at['id']!r} (line {poisoned_at['line']})")
    assert not output.exists() and not work_dir_for(str(output)).exists()


def test_resume_start_is_the_first_unfinished_window():
    from llmprobe.tracing.encoding import EncodedPrompt
    from llmprobe.tracing.prompts import PromptRecord
    from llmprobe.tracing.run import TracePlan

    def resume_start(done: set[int], n_prompts: int, window: int) -> int:
        """The first prompt of the first window the plan gives a resume (n_prompts: none)."""
        prompts = [EncodedPrompt(PromptRecord(i, str(i), "x", i + 1), [0] * (1 + i * 7 % 5), {}, {})
                   for i in range(n_prompts)]
        remaining = TracePlan(prompts, window).remaining(done)
        return min(e.record.index for e in remaining[0]) if remaining else n_prompts

    assert resume_start(set(), 100, 16) == 0
    assert resume_start(set(range(40)), 100, 16) == 32
    assert resume_start(set(range(32)) | {33, 40}, 100, 16) == 32
    assert resume_start(set(range(100)), 100, 16) == 100
