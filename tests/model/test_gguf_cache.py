"""The GGUF conversion cache is keyed by content, prunable, and says what the weights are (issue 16, item 6)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from llmprobe.model.gguf import CONVERSION_MANIFEST, _conversion_dir, convert_gguf, gguf_file_type
from llmprobe.model.sources import cache_dir, default_gguf, gguf_sha256, weights_fingerprint
from tests.cli_helpers import run_cli


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch, request):
    if "real_model" not in request.keywords:
        monkeypatch.setenv("LLMPROBE_CACHE", str(tmp_path / "cache"))


def fake_gguf(path: Path, file_type: int = 3, name: str = "tiny") -> Path:
    """A GGUF header (no tensors): enough for hashing, the cache lookup and the quantization field."""
    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    body = (string("general.architecture") + struct.pack("<I", 8) + string("llama")
            + string("general.languages") + struct.pack("<IIQ", 9, 8, 2) + string("en") + string("fr")
            + string("general.name") + struct.pack("<I", 8) + string(name)
            + string("general.file_type") + struct.pack("<II", 4, file_type))
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 4) + body)
    return path


def cached_entry(name: str, source: Path, sha256: str, converted: str = "2026-01-01T00:00:00Z") -> Path:
    """A conversion as the cache holds it: complete (manifest, config, tokenizer, weights), so it is used."""
    entry = cache_dir() / "converted" / name
    entry.mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(b"x" * 1000)
    (entry / "config.json").write_text("{}")
    (entry / "tokenizer.json").write_text("{}")
    (entry / CONVERSION_MANIFEST).write_text(json.dumps({"source": str(source), "source_sha256": sha256,
                                                         "converted_utc": converted}))
    return entry


def test_the_same_gguf_from_two_paths_is_converted_once(tmp_path):
    (tmp_path / "venv1").mkdir()
    (tmp_path / "venv2").mkdir()
    first = fake_gguf(tmp_path / "venv1" / "m.gguf")
    second = fake_gguf(tmp_path / "venv2" / "m.gguf")
    assert gguf_sha256(first) == gguf_sha256(second)
    entry = cached_entry("m-made-from-venv1", first, gguf_sha256(first))  # an entry keyed by the old path scheme
    assert convert_gguf(second) == entry  # found by content: no second conversion
    other = fake_gguf(tmp_path / "other.gguf", name="another model")
    assert gguf_sha256(other) != gguf_sha256(first)
    assert _conversion_dir(other).name == f"other-{gguf_sha256(other)[:16]}"


def test_quantization_is_read_from_the_header(tmp_path):
    assert gguf_file_type(fake_gguf(tmp_path / "q.gguf", file_type=3)) == "Q4_1"
    assert gguf_file_type(fake_gguf(tmp_path / "k.gguf", file_type=15)) == "Q4_K_M"
    (tmp_path / "bad.gguf").write_bytes(b"nope")
    assert gguf_file_type(tmp_path / "bad.gguf") is None
    assert gguf_file_type(default_gguf()) == "Q4_1"  # the embedded default model


def test_models_prune_removes_duplicates_orphans_and_leftovers(tmp_path, capsysbinary, monkeypatch):
    source = fake_gguf(tmp_path / "m.gguf")
    digest = gguf_sha256(source)
    kept = cached_entry("m-aaaa", source, digest, "2026-01-01T00:00:00Z")
    duplicate = cached_entry("m-bbbb", source, digest, "2026-02-01T00:00:00Z")
    orphan = cached_entry("gone-cccc", tmp_path / "deleted.gguf", "0" * 64)
    leftover = cache_dir() / "converted" / ".m-dddd.1234.partial"
    leftover.mkdir()
    code, stdout, err = run_cli(["models", "--prune"], capsysbinary, monkeypatch)
    assert code == 0, err
    text = stdout.decode()
    assert "pruned 3 cache entries" in text
    assert "duplicate of another conversion" in text and "no longer exists" in text and "interrupted" in text
    assert kept.exists() and not duplicate.exists() and not orphan.exists() and not leftover.exists()
    code, stdout, _ = run_cli(["models", "--json"], capsysbinary, monkeypatch)
    inventory = json.loads(stdout)
    assert [entry["path"] for entry in inventory["cached"]] == [str(kept)]
    assert inventory["default"]["quantization"] == "Q4_1" and inventory["default"]["loaded_as"] == "float32"


def test_fingerprints_are_memoized_whole_and_only_as_memos(tmp_path, monkeypatch):
    """The memo holds the whole fingerprint (written through llmprobe.files, no leftovers); a cache that
    cannot hold it costs the hash again, never the fingerprint."""
    gguf = fake_gguf(tmp_path / "m.gguf")
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"\x00" * 64)
    content = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert gguf_sha256(gguf) == content
    weights = weights_fingerprint(checkpoint)
    assert weights.startswith("sha256:")
    memos = sorted(p.read_text() for p in (cache_dir() / "fingerprints").iterdir())
    assert memos == sorted([content, weights])
    assert gguf_sha256(gguf) == content and weights_fingerprint(checkpoint) == weights  # read back from the memos
    for memo in (cache_dir() / "fingerprints").iterdir():  # issue 26: a damaged memo is hashed again, never trusted
        memo.write_bytes(b"\xff" if "gguf" in memo.name else b"sha256:not-a-hash")
    assert gguf_sha256(gguf) == content and weights_fingerprint(checkpoint) == weights
    assert sorted(p.read_text() for p in (cache_dir() / "fingerprints").iterdir()) == sorted([content, weights])
    unusable = tmp_path / "cache-is-a-file"
    unusable.write_text("")
    monkeypatch.setenv("LLMPROBE_CACHE", str(unusable))
    assert gguf_sha256(gguf) == content and weights_fingerprint(checkpoint) == weights
    assert unusable.read_text() == ""


@pytest.mark.real_model
def test_default_model_metadata_says_it_is_a_dequantized_q4_1_gguf(real_loaded):
    provenance = real_loaded.provenance()
    assert provenance["gguf_quantization"] == "Q4_1"
    assert provenance["weights_precision"].startswith("float32, de-quantized")
    assert provenance["dtype"] == "float32"
