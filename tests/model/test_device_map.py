"""Big-model placement through accelerate: a dispatched or offloaded model traces to the same numbers.

The reference is the same checkpoint loaded whole on the CPU and traced by the same engine; the
dispatched copy has layers (and the output head) offloaded to disk, which leaves their weights on
the meta device and puts accelerate's hooks on the modules. The trace hook must sit beside those
hooks, not replace them.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from llmprobe.tracing.settings import TraceSettings
from llmprobe.errors import UsageError
from llmprobe.model.loading import load_model, parse_max_memory
from tests.cli_helpers import assert_one_line_error, run_cli
from tests.model.comparison import PROMPTS, assert_same_rows, records, trace_table


SETTINGS = dict(top_k=5, targets=[" heads", " tails"], max_new_tokens=3, batch_size=2)


def offload_map(num_layers: int) -> dict[str, str]:
    """Embeddings and the first layer in memory; the other layers, the final norm and the head on disk."""
    placement = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu"}
    placement.update({f"model.layers.{i}": "disk" for i in range(1, num_layers)})
    placement.update({"model.norm": "disk", "lm_head": "disk"})
    return placement


def test_disk_offloaded_tiny_model_traces_like_the_whole_model(tiny_model_dir, tiny_loaded, tmp_path):
    dispatched = load_model(str(tiny_model_dir), dtype="float32", device_map=offload_map(3),
                            offload_folder=str(tmp_path / "offload"))
    head = dispatched.model.get_output_embeddings()
    assert head.weight.device.type == "meta" and dispatched.device.type == "cpu"  # really offloaded
    accelerate_hook = head._hf_hook
    prompts = records()
    got = trace_table(dispatched, TraceSettings(**SETTINGS), prompts)
    want = trace_table(tiny_loaded, TraceSettings(**SETTINGS), prompts)
    assert "generated" in got.column("phase").to_pylist()
    assert_same_rows(got, want, atol=1e-5)
    # accelerate's hook is untouched and the trace hook is gone
    assert head._hf_hook is accelerate_hook and not head._forward_hooks
    assert all(hasattr(dispatched.model.model.layers[i], "_hf_hook") for i in range(3))


def test_cli_device_map_auto_with_max_memory_offloads_and_matches(tiny_model_dir, tiny_loaded, tmp_path,
                                                                   capsysbinary, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "t.parquet"
    code, _, err = run_cli(["trace", str(prompts), "-m", str(tiny_model_dir), "-o", str(out), "--dtype", "float32",
                            "--device-map", "auto", "--max-memory", "cpu=150KB", "--offload-folder",
                            str(tmp_path / "off"), "--top-k", "5", "--targets", " heads, tails", "-q"],
                           capsysbinary, monkeypatch)
    assert code == 0, err
    written = pq.read_table(out)
    placement = json.loads(written.schema.metadata[b"llmprobe"])["device_map"]
    assert "disk" in placement.values() and "cpu" in placement.values()
    want = trace_table(tiny_loaded, TraceSettings(top_k=5, targets=[" heads", " tails"]), records())
    assert_same_rows(written, want, atol=1e-5)


def test_parse_max_memory():
    assert parse_max_memory("0=20GiB, 1=18GiB,cpu=64GiB") == {0: "20GiB", 1: "18GiB", "cpu": "64GiB"}
    assert parse_max_memory("cpu=1000000") == {"cpu": 1000000}
    for bad, needle in (("20GiB", "DEVICE=SIZE"), ("gpu0=1GiB", "unknown device"), ("0=lots", "bad size"),
                        ("0=", "DEVICE=SIZE")):
        with pytest.raises(UsageError, match=needle) as caught:
            parse_max_memory(bad)
        assert str(caught.value).startswith("--max-memory:")


def test_placement_options_need_a_device_map(tiny_model_dir, tmp_path, capsysbinary, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    for extra, flag in ((["--max-memory", "cpu=1GiB"], "--max-memory"), (["--offload-folder", "x"], "--offload-folder")):
        code, _, err = run_cli(["trace", str(prompts), "-m", str(tiny_model_dir), "-o", str(tmp_path / "t.parquet"),
                                *extra], capsysbinary, monkeypatch)
        assert_one_line_error(code, err, flag, "--device-map")
        assert not (tmp_path / "t.parquet").exists()


@pytest.mark.real_model
def test_real_model_offloaded_to_disk_traces_like_the_whole_model(real_loaded, tmp_path):
    """SmolLM2 with half its layers, its final norm and (tied) head placed by accelerate under a 300 MB cap."""
    dispatched = load_model(None, dtype="float32", device_map="auto", max_memory={"cpu": "300MB"},
                            offload_folder=str(tmp_path / "offload"))
    assert "disk" in dispatched.device_map.values()
    prompts = records(PROMPTS[:2])
    settings = dict(top_k=5, targets=[" heads", " tails"], batch_size=2)
    got = trace_table(dispatched, TraceSettings(**settings), prompts)
    want = trace_table(real_loaded, TraceSettings(**settings), prompts)
    assert_same_rows(got, want, atol=1e-4)
    assert hasattr(dispatched.model.model.layers[-1], "_hf_hook")
