"""llmprobe: trace a Llama checkpoint's next-token distributions and test them against Bayes.

The notebook API (:mod:`llmprobe.api`): ``llmprobe.load_model()``, ``llmprobe.experiment(config)``,
``llmprobe.trace(prompts, model=..., top_k=..., targets=...)`` -> DataFrame,
``llmprobe.fit_posterior(trace)`` -> result with ``.summary`` / ``.table``, ``llmprobe.fit_scaling``,
``llmprobe.fit_prior``;
``llmprobe.read_trace(path)`` loads a trace file as a DataFrame. They load lazily, so ``import
llmprobe`` is light; ``llmprobe.bayes`` holds the pure numpy/scipy statistics and imports no torch.
The tracing code lives in ``llmprobe.tracing`` (not ``llmprobe.trace``, which is the function).
"""

from llmprobe.version import __version__

_API = ("trace", "load_model", "experiment", "fit_posterior", "fit_scaling", "fit_prior")
_READER = ("read_trace", "open_trace")


def __getattr__(name: str):
    if name in _READER:
        from llmprobe.tracing import reader

        return getattr(reader, name)
    if name in _API:
        from llmprobe import api

        return getattr(api, name)
    raise AttributeError(f"module 'llmprobe' has no attribute {name!r}")


__all__ = ["__version__", "trace", "load_model", "experiment", "fit_posterior", "fit_scaling", "fit_prior", "read_trace",
           "open_trace"]  # _API and _READER, spelled out for static tools
