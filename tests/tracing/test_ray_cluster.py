"""``trace --engine ray`` on a real two-node Ray cluster on this machine (issue 26), not only a local Ray.

Skipped unless ``LLMPROBE_RAY_CLUSTER=1`` (about a minute; the suite stays fast). The test starts a head
and a second node with ``ray start --block`` (each its own raylet, the session files in a temporary
directory, node addresses on loopback), with token authentication on and one token given to the head, the node
and llmprobe's driver through ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` (docs/scale-out.md). Two
actors of 1.5 CPUs on two nodes of 2 CPUs cannot share a node, so both nodes trace; the part files must
hold the local engine's rows. It stops only the two ``ray start`` processes it started (each stops the
processes it started) and never calls ``ray stop``, which would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from llmprobe.tracing.reader import open_trace
from llmprobe.tracing.settings import TraceSettings
from tests.model.comparison import PROMPTS, assert_same_rows, records, trace_table

pytest.importorskip("ray", reason="Ray is not installed (pip install 'llmprobe[ray]')")
pytestmark = pytest.mark.skipif(not os.environ.get("LLMPROBE_RAY_CLUSTER"),
                                reason="starts a two-node Ray cluster (about a minute): set LLMPROBE_RAY_CLUSTER=1")

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive_nodes(address: str, env: dict[str, str]) -> int:
    code = (f"import ray; ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False);"
            " print(sum(n['Alive'] for n in ray.nodes()))")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return int(result.stdout.strip() or 0) if result.returncode == 0 else 0


def start(args: list[str], env: dict[str, str], log, started: list[subprocess.Popen]) -> None:
    """``ray start --block ARGS`` in a process group of its own (appended to ``started`` at once, so it is
    stopped whatever happens next); returns once it says the node runs."""
    with open(log, "wb") as sink:
        proc = subprocess.Popen([RAY, "start", *args], env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    started.append(proc)
    deadline = time.monotonic() + 120
    while b"Ray runtime started" not in log.read_bytes():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.5)


@pytest.fixture
def cluster(tmp_path):
    """A head and a second node on this machine; yields (address, environment with the token)."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats"]
    started: list[subprocess.Popen] = []
    sessions = tempfile.mkdtemp(prefix="llmprobe-ray-", dir="/tmp")  # Unix socket paths must stay short
    try:
        start(["--head", f"--port={port}", f"--temp-dir={sessions}", "--include-dashboard=false", *common], env,
              tmp_path / "head.log", started)
        start([f"--address={address}", *common], env, tmp_path / "node.log", started)
        assert alive_nodes(address, env) == 2, (tmp_path / "node.log").read_text()
        yield address, env
    finally:
        for proc in reversed(started):  # `ray start --block` stops what it started on SIGTERM
            proc.send_signal(signal.SIGTERM)
        for proc in started:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its own process group: only what it started
        shutil.rmtree(sessions, ignore_errors=True)


def test_a_two_node_cluster_gives_the_local_engines_rows(cluster, tiny_model_dir, tiny_loaded, tmp_path):
    address, env = cluster
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "trace"
    result = subprocess.run([sys.executable, "-m", "llmprobe", "trace", str(prompts), "-m", str(tiny_model_dir),
                             "-o", str(out), "--engine", "ray", "--ray-address", address, "--ray-actors", "2",
                             "--ray-cpus-per-actor", "1.5", "--ray-prompts-per-task", "1", "--dtype", "float32",
                             "--top-k", "6", "--targets", " heads, tails", "-q"],
                            env={**env, "LLMPROBE_CACHE": str(tmp_path / "cache")}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    got = open_trace(out)
    want = trace_table(tiny_loaded, TraceSettings(top_k=6, targets=[" heads", " tails"]), records())
    assert_same_rows(got.table, want, atol=1e-5)
    assert got.meta["engine"] == "ray" and got.meta["ray_actors"] == 2
    without_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_")}
    refused = subprocess.run([sys.executable, "-m", "llmprobe", "trace", str(prompts), "-m", str(tiny_model_dir), "-o",
                              str(tmp_path / "refused"), "--engine", "ray", "--ray-address", address, "-q"],
                             env=without_token, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr  # one line, not a traceback
    assert "--ray-address: cannot connect" in refused.stderr and "RAY_AUTH_TOKEN" in refused.stderr
