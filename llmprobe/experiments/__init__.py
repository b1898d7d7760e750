"""Synthetic in-context-learning experiments: TOML definitions in, JSONL prompt records out.

An experiment draws sequences of categorical outcomes from a true distribution θ and writes each
sequence as text ("I just flipped a coin, and it came up heads, then tails, then"), with a *mark*
at every point where the next thing in the text would be the next outcome. ``llmprobe trace``
records the model's next-token distribution at each mark; ``fit-posterior`` compares it with the
Dirichlet predictive (α_k + n_k) / (α_0 + n) for the running counts stored in the mark.

This is input generation, not analysis: a room of its own, below ``analysis/`` (which reads what
it writes) and ``control/`` (which trains on it). One module per job:

* :mod:`.config`: the definition: data classes, loading and validating the TOML, CLI overrides;
* :mod:`.schema`: the allowed keys of each table and the checks every value goes through;
* :mod:`.templates`: the template language: text fields parsed into pieces, mark-context checks;
* :mod:`.sampling`: the random streams, keyed by value so that sweeps can grow;
* :mod:`.render`: records: prompt text, marks, layouts (``generate``);
* :mod:`.jsonl`: writing records as JSON Lines to an open stream.

Two forms of definition (docs/experiments.md has the schema): one ``[template]`` table (the original
form: only ``example`` is a format string, output byte-for-byte what it has always been) or a
``[[templates]]`` list (the peers' protocols: many sentence frames per task, value placeholders in
every text field, an optional ``instruction`` that is the split point for ``trace --chat prefill``).
Options of either form: ``draws = "independent"`` redraws the outcomes of every per-n prompt, ``ns``
picks the n of per-n prompts, ``phases`` replaces θ by a chain of distributions.

Invariants: same definition and seed, same bytes; each random stream is keyed by the seed, the
value of θ (or of the phases), the replicate and, where draws are independent, the template and n,
so adding θs, templates, sequences or examples leaves existing sequences unchanged. Pure Python +
numpy: nothing here imports torch, evaluates anything from a config, treats a value as a path, or
opens a file for writing.

Public API (what the CLI calls)::

    exp = load_experiment(path)                      # UsageError on any problem, naming the file
    records = generate(exp, seed=..., n_max=..., sequences=..., layout=...)   # overrides or None
    write_jsonl(records, sys.stdout)
"""

from llmprobe.experiments.config import DRAWS, LAYOUTS, Category, Experiment, load_experiment, loads_experiment
from llmprobe.experiments.jsonl import write_jsonl
from llmprobe.experiments.render import generate
from llmprobe.experiments.templates import Template

__all__ = [
    "DRAWS",
    "LAYOUTS",
    "Category",
    "Experiment",
    "Template",
    "generate",
    "load_experiment",
    "loads_experiment",
    "write_jsonl",
]
