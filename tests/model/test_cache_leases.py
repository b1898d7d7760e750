"""The conversion cache under concurrency and crashes (issue 26, item 1): a prune during a conversion, a
conversion killed mid-write, two conversions of one GGUF, a prune while another process uses an entry, and
an incomplete entry. The writers are real processes (a real ``llmprobe trace``, or ``convert_gguf`` in a
fresh interpreter) converting a real, tiny GGUF; the pruner is ``llmprobe models --prune``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from llmprobe.model.gguf import CONVERSION_MANIFEST, _conversion_dir, convert_gguf, incomplete
from llmprobe.model.sources import cache_dir
from tests.cli.fault_fixtures import REPO
from tests.cli_helpers import run_cli
from tests.model.tiny_gguf import build_tiny_gguf

pytest.importorskip("fcntl")

CONVERTER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from llmprobe.model.gguf import convert_gguf
    print(convert_gguf(Path(sys.argv[1]), log=lambda m: print(m, file=sys.stderr, flush=True)), flush=True)
    if len(sys.argv) > 2:  # keep using it, as a serve or a notebook kernel does
        time.sleep(600)
""")


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    return build_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_model_dir)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LLMPROBE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def env(cache: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "LLMPROBE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def converter(gguf: Path, cache: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CONVERTER, str(gguf), *extra], env=env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_while_staging(proc: subprocess.Popen, cache: Path) -> Path:
    """SIGSTOP ``proc`` as soon as its conversion's staging directory exists; returns that directory."""
    deadline = time.monotonic() + 120
    while True:
        staging = list((cache / "converted").glob(".*.partial")) if (cache / "converted").is_dir() else []
        if staging:
            proc.send_signal(signal.SIGSTOP)
            return staging[0]
        if proc.poll() is not None:
            pytest.fail(f"the process ended before converting: {proc.stderr.read()}")
        assert time.monotonic() < deadline, "no staging directory appeared"
        time.sleep(0.0005)


def prune(capsysbinary, monkeypatch) -> tuple[list[dict], str]:
    code, stdout, err = run_cli(["models", "--prune", "--json"], capsysbinary, monkeypatch)
    assert code == 0, err
    return json.loads(stdout)["pruned"], err


def test_prune_during_a_conversion_keeps_it_and_the_trace_succeeds(tiny_gguf, cache, tmp_path, capsysbinary,
                                                                   monkeypatch):
    """Issue 26 item 1: `models --prune` while a trace converts used to delete the staging directory (the
    trace died with an unexpected FileNotFoundError, or installed an entry without config.json)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("heads tails heads\nthe coin came up\n")
    trace = subprocess.Popen([sys.executable, "-m", "llmprobe", "trace", str(prompts), "--model", str(tiny_gguf),
                              "-o", str(tmp_path / "t.parquet"), "--device", "cpu", "-q"], env=env(cache),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        staging = stop_while_staging(trace, cache)
        pruned, err = prune(capsysbinary, monkeypatch)
        assert pruned == [] and staging.is_dir()
        assert "kept" in err and staging.name in err
    finally:
        trace.send_signal(signal.SIGCONT)
    assert trace.wait(timeout=300) == 0, trace.stderr.read()
    entries = [p for p in (cache / "converted").iterdir()]
    assert len(entries) == 1 and incomplete(entries[0]) is None
    assert (tmp_path / "t.parquet").is_file()


def test_a_conversion_killed_mid_write_installs_nothing_and_prune_removes_its_leftover(tiny_gguf, cache,
                                                                                       capsysbinary, monkeypatch):
    """kill -9 while the staging directory is being written: no entry, the lease is released with the process,
    so prune removes the leftover, and the next conversion succeeds."""
    proc = converter(tiny_gguf, cache)
    staging = stop_while_staging(proc, cache)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert [p.name for p in (cache / "converted").iterdir()] == [staging.name]
    pruned, _ = prune(capsysbinary, monkeypatch)
    assert [(p["path"], p["reason"]) for p in pruned] == [(str(staging), "left by an interrupted conversion")]
    assert list((cache / "converted").iterdir()) == []


def test_two_processes_converting_one_gguf_convert_it_once(tiny_gguf, cache):
    first, second = converter(tiny_gguf, cache), converter(tiny_gguf, cache)
    results = [proc.communicate(timeout=300) for proc in (first, second)]
    assert [proc.returncode for proc in (first, second)] == [0, 0], results
    assert results[0][0] == results[1][0]  # the same entry
    assert sum(err.count("converting tiny.gguf") for _, err in results) == 1, results
    entries = list((cache / "converted").iterdir())
    assert len(entries) == 1 and incomplete(entries[0]) is None


def test_prune_keeps_an_entry_a_running_process_uses_and_removes_it_after(tiny_gguf, cache, tmp_path, capsysbinary,
                                                                         monkeypatch):
    """An orphan (its GGUF deleted) is pruned only once no process holds its lease; kill -9 releases it."""
    gguf = Path(shutil.copy(tiny_gguf, tmp_path / "gone.gguf"))
    user = converter(gguf, cache, "keep using it")
    try:
        entry = Path(user.stdout.readline().strip())
        assert incomplete(entry) is None
        gguf.unlink()
        pruned, err = prune(capsysbinary, monkeypatch)
        assert pruned == [] and entry.is_dir() and f"kept {entry}" in err
    finally:
        user.kill()
        user.wait(timeout=60)
    pruned, _ = prune(capsysbinary, monkeypatch)
    assert [(p["path"], p["reason"]) for p in pruned] == [(str(entry), "source GGUF no longer exists")]


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory) -> Path:
    """One conversion of the tiny GGUF, copied into each test's cache."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("LLMPROBE_CACHE", str(tmp_path_factory.mktemp("template-cache")))
        return convert_gguf(tiny_gguf)


@pytest.mark.parametrize("damage", ["no config.json", "truncated weights", "manifest not JSON"])
def test_an_incomplete_entry_is_converted_again_never_used(damage, tiny_gguf, converted, cache, capsysbinary,
                                                           monkeypatch):
    """Issue 26 item 1: an installed entry must be complete; a damaged one (by hand, a disk fault, a prune of an
    older llmprobe) is found on load and converted again, is never listed, and prune removes one nobody uses."""
    entry = cache / "converted" / converted.name
    shutil.copytree(converted, entry)
    if damage == "no config.json":
        (entry / "config.json").unlink()
    elif damage == "truncated weights":
        weights = entry / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        (entry / CONVERSION_MANIFEST).write_text("{not json")
    assert incomplete(entry) is not None
    code, stdout, err = run_cli(["models", "--json"], capsysbinary, monkeypatch)
    assert code == 0 and json.loads(stdout)["cached"] == [], err
    shutil.copytree(entry, cache / "converted" / "older-entry")
    log: list[str] = []
    assert convert_gguf(tiny_gguf, log.append) == entry
    assert any("is incomplete" in line and "converting it again" in line for line in log), log
    assert incomplete(entry) is None and _conversion_dir(tiny_gguf) == entry
    pruned, _ = prune(capsysbinary, monkeypatch)
    assert [p["path"] for p in pruned] == [str(cache / "converted" / "older-entry")]
    assert pruned[0]["reason"].startswith("incomplete conversion")
    assert cache_dir() == cache and [p.name for p in (cache / "converted").iterdir()] == [entry.name]
