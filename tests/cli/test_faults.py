"""Faults outside the input: signals, a closed pipe, unexpected errors, outputs that must not be written
(an input, a device, a directory), concurrent writers, planted symlinks, a full disk, a read-only
directory, an unusable cache. Each ends in one line on stderr and leaves nothing behind.

Signals are real: SIGINT is sent to a real ``llmprobe`` process (streaming to stdout), or, to hit a
chosen moment (model loading, a fit), by the command to itself from inside a patched step. Disk faults
are injected as the OSError the kernel would raise (ENOSPC, EROFS), since tests cannot mount a tmpfs.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llmprobe.errors import UsageError

import llmprobe.files
from llmprobe.tracing.checkpoint import work_dir_for
from tests.cli.fault_fixtures import COIN, coin_trace, llmprobe_process
from tests.cli_helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llmprobe: error:") and "Traceback" not in err, err
    return lines[0]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def self_interrupt(*args, **kwargs):
    """A step that receives a real Ctrl-C."""
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    raise AssertionError("SIGINT did not arrive")


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "p.txt"
    path.write_text("The capital of France is\nOnce upon a time\n")
    return path


@pytest.fixture
def trace_args(tiny_model_dir):
    def args(prompts, output, *extra):
        return ["trace", str(prompts), "-o", str(output), "--model", str(tiny_model_dir), "--device", "cpu",
                "--top-k", "3", *extra]
    return args


# ------------------------------------------------------------------------------------------- signals


def test_sigint_while_streaming_a_trace_to_stdout_exits_130_with_a_line(tiny_model_dir, tmp_path):
    prompts = tmp_path / "many.txt"
    prompts.write_text("".join(f"prompt number {i} about heads and tails\n" for i in range(3000)))
    proc = llmprobe_process(["trace", str(prompts), "-o", "-", "--format", "jsonl", "--model", str(tiny_model_dir),
                             "--device", "cpu", "--batch-size", "1", "-q"], tmp_path)
    first = proc.stdout.readline()  # rows are flowing
    assert first.startswith(b"{"), proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in one_line(err.decode()) and "incomplete" in err.decode()
    assert rest.count(b"\n") < 3000 * 7  # it really was cut short


def test_sigint_while_streaming_an_experiment_exits_130(tmp_path):
    proc = llmprobe_process(["experiment", str(COIN), "--sequences", "200000"], tmp_path)
    assert proc.stdout.read(4096)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in one_line(err.decode())


def test_a_closed_pipe_exits_141_quietly(tmp_path):
    proc = llmprobe_process(["experiment", str(COIN), "--sequences", "200000"], tmp_path)
    assert proc.stdout.read(100)
    proc.stdout.close()  # like `| head -c 100`
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141, err
    assert err == b""


def test_sigint_during_model_loading_exits_130(prompts, trace_args, tmp_path, capsys, monkeypatch):
    from llmprobe.model.loading import ModelOptions

    monkeypatch.setattr(ModelOptions, "load", self_interrupt)
    output = tmp_path / "out.parquet"
    code, _, err = run_cli(trace_args(prompts, output), capsys, monkeypatch)
    assert code == 130 and "interrupted" in one_line(err)
    assert not output.exists() and leftovers(tmp_path) == []


def test_sigint_during_fit_posterior_exits_130(tiny_loaded, tmp_path, capsys, monkeypatch):
    import llmprobe.analysis.fits

    trace = coin_trace(tiny_loaded, tmp_path)
    monkeypatch.setattr(llmprobe.analysis.fits, "fit_posterior", self_interrupt)
    output = tmp_path / "fit.parquet"
    code, _, err = run_cli(["fit-posterior", str(trace), "-o", str(output), "--bootstrap", "2"], capsys, monkeypatch)
    assert code == 130 and "interrupted" in one_line(err)
    assert not output.exists()


# ------------------------------------------------------------------------------------ unexpected errors


def test_an_unexpected_error_is_one_line_with_the_debug_hint(tmp_path, capsys, monkeypatch):
    import llmprobe.experiments

    def broken(*args, **kwargs):
        raise RuntimeError("something\nnobody expected")

    monkeypatch.setattr(llmprobe.experiments, "generate", broken)
    code, _, err = run_cli(["experiment", str(COIN), "-o", str(tmp_path / "p.jsonl")], capsys, monkeypatch)
    line = one_line(err)
    assert code == 1 and "RuntimeError: something nobody expected" in line and "LLMPROBE_DEBUG=1" in line
    monkeypatch.setenv("LLMPROBE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="nobody expected"):
        run_cli(["experiment", str(COIN), "-o", str(tmp_path / "p.jsonl")], capsys, monkeypatch)


# --------------------------------------------------------------------------------- forbidden outputs


def test_an_input_is_never_the_output(prompts, trace_args, tiny_loaded, tmp_path, capsys, monkeypatch):
    original = prompts.read_bytes()
    result = run_cli(trace_args(prompts, prompts, "--force"), capsys, monkeypatch)
    assert_one_line_error(result[0], result[2], str(prompts), "is also an input")
    assert prompts.read_bytes() == original
    trace = coin_trace(tiny_loaded, tmp_path)
    before = trace.read_bytes()
    alias = tmp_path / "sub" / ".." / trace.name  # another spelling of the same file
    (tmp_path / "sub").mkdir()
    for args in (["fit-posterior", str(trace), "-o", str(alias), "--force"],
                 ["fit-prior", str(trace), "-o", str(trace), "--force"],
                 ["plot", str(trace), "-o", str(trace.with_suffix(".png")), "--force"]):
        if args[0] == "plot":  # a figure over its own trace needs a .png input: link the trace there
            os.link(trace, trace.with_suffix(".png"))
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert_one_line_error(code, err, "is also an input")
    assert trace.read_bytes() == before
    config = tmp_path / "coin.toml"
    config.write_bytes(COIN.read_bytes())
    code, _, err = run_cli(["experiment", str(config), "-o", str(config), "--force"], capsys, monkeypatch)
    assert_one_line_error(code, err, "is also an input")
    assert config.read_bytes() == COIN.read_bytes()


def test_an_output_inside_an_input_directory_is_refused(tiny_loaded, tmp_path, capsys, monkeypatch):
    traces = tmp_path / "traces"
    traces.mkdir()
    coin_trace(tiny_loaded, traces)
    code, _, err = run_cli(["fit-prior", str(traces), "-o", str(traces / "prior.json")], capsys, monkeypatch)
    assert_one_line_error(code, err, "is also an input")


def special_files(tmp_path: Path) -> list[Path]:
    """A FIFO, and (as root) a character device like /dev/null — made in tmp_path, so that a regression can
    never replace the real /dev/null (as the old code did when run as root)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    made = [fifo]
    if os.geteuid() == 0:
        device = tmp_path / "null-device"
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        made.append(device)
    return made


def test_a_device_or_pipe_is_never_replaced(prompts, trace_args, tmp_path, capsys, monkeypatch):
    for special in special_files(tmp_path):
        before = os.lstat(special)
        for args in (trace_args(prompts, special, "--force"), ["experiment", str(COIN), "-o", str(special), "--force"]):
            code, _, err = run_cli(args, capsys, monkeypatch)
            assert_one_line_error(code, err, str(special), "not a regular file")
        after = os.lstat(special)
        assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)


def test_an_existing_directory_is_refused_even_with_force(tiny_loaded, tmp_path, capsys, monkeypatch):
    trace = coin_trace(tiny_loaded, tmp_path)
    target = tmp_path / "taken"
    target.mkdir()
    for args in (["experiment", str(COIN), "-o", str(target), "--force"],
                 ["fit-posterior", str(trace), "-o", str(target), "--force", "--bootstrap", "2"]):
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert_one_line_error(code, err, str(target), "is a directory")
    assert list(target.iterdir()) == []


# ------------------------------------------------------------------------------------ concurrent runs


def test_a_concurrent_writer_wins_and_the_loser_says_so(tmp_path, capsys, monkeypatch):
    """Both passed the existence check; the other one finished first: its file stays, this run fails."""
    import llmprobe.experiments

    output = tmp_path / "p.jsonl"
    generate = llmprobe.experiments.generate

    def racing(*args, **kwargs):
        output.write_text("the other run's finished output\n")
        return generate(*args, **kwargs)

    monkeypatch.setattr(llmprobe.experiments, "generate", racing)
    code, _, err = run_cli(["experiment", str(COIN), "-o", str(output)], capsys, monkeypatch)
    assert_one_line_error(code, err, str(output), "another run", "nothing was replaced")
    assert output.read_text() == "the other run's finished output\n"
    assert leftovers(tmp_path) == []
    output.unlink()
    code, _, err = run_cli(["experiment", str(COIN), "-o", str(output), "--force"], capsys, monkeypatch)
    assert code == 0, err  # --force: replacing is what was asked
    assert output.read_text().startswith("{")


def test_no_replace_rename_never_replaces(tmp_path):
    source, target = tmp_path / "new", tmp_path / "old"
    source.write_text("new")
    target.write_text("old")
    with pytest.raises(FileExistsError):
        llmprobe.files.rename_noreplace(source, target)
    assert target.read_text() == "old" and source.read_text() == "new"
    target.unlink()
    llmprobe.files.rename_noreplace(source, target)
    assert target.read_text() == "new" and not source.exists()


# ------------------------------------------------------------------------------------------- symlinks


def test_a_planted_symlink_at_the_work_directory_is_not_followed(prompts, trace_args, tmp_path, capsys,
                                                                  monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    output = tmp_path / "out.parquet"
    work_dir_for(str(output)).symlink_to(elsewhere, target_is_directory=True)
    for extra in ((), ("--resume",), ("--force",)):
        code, _, err = run_cli(trace_args(prompts, output, *extra), capsys, monkeypatch)
        assert_one_line_error(code, err, "symbolic link")
    assert list(elsewhere.iterdir()) == [] and not output.exists()
    assert work_dir_for(str(output)).is_symlink()  # refused, not removed: it is not ours


def test_a_planted_symlink_inside_the_work_directory_is_not_followed(tmp_path):
    from llmprobe.tracing.checkpoint import WorkDir

    output = tmp_path / "out.parquet"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    work = WorkDir.open(str(output), {"f": 1}, {"m": 1})
    work.close()
    lock = work_dir_for(str(output)) / "lock"
    lock.unlink()
    lock.symlink_to(victim)
    with pytest.raises(UsageError):
        WorkDir.open(str(output), {"f": 1}, {"m": 1})
    assert victim.read_text() == "precious"


# ----------------------------------------------------------------------- full disk, read-only directory


def enospc_on_fsync(monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(llmprobe.files.os, "fsync", full)


def erofs_on_create(monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(llmprobe.files.tempfile, "mkstemp", read_only)


@pytest.mark.parametrize("fault", [enospc_on_fsync, erofs_on_create])
def test_a_full_disk_or_read_only_directory_is_one_line_and_no_leftovers(fault, tiny_loaded, tmp_path, capsys,
                                                                        monkeypatch):
    trace = coin_trace(tiny_loaded, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    commands = {
        "p.jsonl": ["experiment", str(COIN)],
        "prior.json": ["fit-prior", str(trace)],
        "fit.parquet": ["fit-posterior", str(trace), "--bootstrap", "2", "--min-mass", "0"],
        "fig.png": ["plot", str(trace), "--prompt", "coin-s0000"],
    }
    with monkeypatch.context() as m:
        fault(m)
        for name, args in commands.items():
            code, _, err = run_cli([*args, "-o", str(out_dir / name), "-q"], capsys, monkeypatch)
            reason = "No space left on device" if fault is enospc_on_fsync else "Read-only file system"
            assert_one_line_error(code, err, str(out_dir / name), reason, "nothing was written")
    assert list(out_dir.iterdir()) == []


def test_a_full_disk_during_the_merge_keeps_the_work_for_resume(prompts, trace_args, tmp_path, capsys, monkeypatch):
    output = tmp_path / "out.parquet"
    real_mkstemp = tempfile.mkstemp

    def full(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        os.close(fd)
        os.unlink(name)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(llmprobe.files.tempfile, "mkstemp", full)
        code, _, err = run_cli(trace_args(prompts, output, "-q"), capsys, monkeypatch)
    assert_one_line_error(code, err, str(output), "No space left on device")
    assert not output.exists() and work_dir_for(str(output)).is_dir()
    code, _, err = run_cli(trace_args(prompts, output, "-q", "--resume"), capsys, monkeypatch)
    assert code == 0, err
    assert pq.read_metadata(output).num_rows > 0 and leftovers(tmp_path) == []


def test_an_unwritable_directory_is_refused_before_any_work(prompts, trace_args, tmp_path, capsys, monkeypatch):
    import llmprobe.model.loading

    monkeypatch.setattr(llmprobe.files.os, "access", lambda path, mode: mode != os.W_OK)
    monkeypatch.setattr(llmprobe.model.loading.ModelOptions, "load", self_interrupt)  # must not be reached
    code, _, err = run_cli(trace_args(prompts, tmp_path / "out.parquet"), capsys, monkeypatch)
    assert_one_line_error(code, err, "is not writable")


# ---------------------------------------------------------------------------------------- the cache


def test_an_unusable_cache_is_one_line_before_the_conversion(prompts, tmp_path, capsys, monkeypatch):
    import llmprobe.model.gguf

    cache = tmp_path / "cache-is-a-file"
    cache.write_text("")
    monkeypatch.setenv("LLMPROBE_CACHE", str(cache))
    monkeypatch.setattr(llmprobe.model.gguf, "_save_conversion", self_interrupt)  # must not be reached
    code, _, err = run_cli(["trace", str(prompts), "-o", str(tmp_path / "out.parquet"), "--device", "cpu"], capsys,
                           monkeypatch)
    assert_one_line_error(code, err, str(cache), "LLMPROBE_CACHE")


def test_the_conversion_draws_no_bar_of_its_own(prompts, tmp_path, capsys, monkeypatch):
    """transformers' GGUF conversion bar ignores every setting; llmprobe's log line (silenced by -q) replaces it."""
    import sys

    import transformers
    from tqdm.auto import tqdm

    def converting(*args, **kwargs):
        for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...", file=sys.stderr):
            pass
        raise OSError("stop after the bar")

    monkeypatch.setenv("LLMPROBE_CACHE", str(tmp_path / "empty-cache"))  # so the conversion really starts
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", converting)
    code, _, err = run_cli(["trace", str(prompts), "-o", str(tmp_path / "out.parquet"), "--device", "cpu", "-q"],
                           capsys, monkeypatch)
    assert_one_line_error(code, err, "cannot load GGUF file", "stop after the bar")
    assert "Converting" not in err


@pytest.mark.parametrize("missing", ["renameat2", "renameat2 and hard links"])
def test_no_replace_rename_without_renameat2_or_hard_links(missing, tmp_path, monkeypatch):
    monkeypatch.setattr(llmprobe.files, "_renameat2", lambda: None)
    if "hard links" in missing:
        def no_links(*args, **kwargs):
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        monkeypatch.setattr(llmprobe.files.os, "link", no_links)
    test_no_replace_rename_never_replaces(tmp_path)
