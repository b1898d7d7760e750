"""``--engine ray -q``: Ray's own output (its Python warnings and its C++ core worker's log lines, which go
straight to file descriptor 2) is silenced, and stderr works again for llmprobe's error line afterwards.

(Measured end to end: ``llmprobe trace p.txt -o dir --engine ray -q`` printed Ray's token-authentication
warning and a core-worker line before; nothing now.)"""

from __future__ import annotations

import os
import sys

from llmprobe.tracing.ray_runner import _ray_prints_off_stdout


def test_quiet_silences_what_ray_writes_to_fd_2_and_stdout(capfd):
    with _ray_prints_off_stdout(quiet=True):
        os.write(2, b"[core_worker.cc:2465] Actor ... max_restarts > 0\n")
        print("a worker error Ray prints to stdout")
    os.write(2, b"llmprobe: error: after\n")
    sys.stderr.flush()
    out, err = capfd.readouterr()
    assert out == "" and err == "llmprobe: error: after\n"


def test_without_quiet_ray_prints_go_to_stderr_not_stdout(capfd):
    with _ray_prints_off_stdout(quiet=False):
        print("a worker error Ray prints to stdout")
        sys.stdout.flush()
    out, err = capfd.readouterr()
    assert out == "" and "a worker error" in err
