"""Builders shared by the control, comparison and figure tests: a coin experiment with a known prior, and a
tiny checkpoint series trained on it in seconds that still shows the learning claim.

The series (``tiny_series``): a 2-layer, 32-wide control on 12-flip coins under Dirichlet(3, 1), 200 steps of 16
sequences at learning rate 3e-3, saved every 50 steps. It leaves the plateau of the prior mean after about 100
steps (held-out KL 0.32 bits untrained, about 1e-3 at step 200), so step 0 is far from Bayes and the last step
close to it; about 6 CPU-seconds.
"""

from __future__ import annotations

from pathlib import Path

COIN = """
[experiment]
name = "coin"
n_max = 12
sequences = 4
seed = 1
thetas = [[0.6, 0.4], [0.75, 0.25], [0.9, 0.1]]  # typical under the prior below

[template]
prefix = "I just flipped a coin, and it came up"
example = "{outcome}"
separator = ", then"

[[categories]]
name = "heads"
target = " heads"

[[categories]]
name = "tails"
target = " tails"
"""
PRIOR_TABLE = "\n[prior]\nalpha = [3.0, 1.0]\n"
TINY = ["--layers", "2", "--hidden", "32", "--heads", "4", "--intermediate", "64", "--batch-size", "16",
        "--learning-rate", "1e-2", "--warmup-steps", "5", "--eval-sequences", "32"]
SERIES = ["--layers", "2", "--hidden", "32", "--steps", "200", "--save-every", "50", "--batch-size", "16",
          "--learning-rate", "3e-3", "--warmup-steps", "30", "--eval-sequences", "32"]
SERIES_STEPS = [0, 50, 100, 150, 200]


def write_coin(directory: Path) -> Path:
    path = directory / "coin.toml"
    path.write_text(COIN + PRIOR_TABLE)
    return path


def train_tiny_series(config: Path, output: Path) -> Path:
    """The tiny series (see the module docstring), trained through the library as `wind-tunnel SERIES` does."""
    from llmprobe.control.prior import resolve_prior
    from llmprobe.control.series import Size
    from llmprobe.control.settings import ControlSettings
    from llmprobe.control.series import Sweep
    from llmprobe.control.sweep import train_series
    from llmprobe.experiments import load_experiment

    experiment = load_experiment(config)
    prior = resolve_prior(None, str(config), experiment.category_names)
    settings = ControlSettings(steps=200, save_every=50, batch_size=16, learning_rate=3e-3, warmup_steps=30,
                               eval_sequences=32)
    train_series(experiment, prior, Sweep([Size(2, 32)], settings), str(output))
    return output
