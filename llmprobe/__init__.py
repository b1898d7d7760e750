"""llmprobe: trace a Llama checkpoint's next-token distributions and test them against Bayes.

``llmprobe.read_trace(path)`` loads a trace as a pandas DataFrame; ``llmprobe.bayes`` holds the
pure numpy/scipy statistics and imports no torch.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("read_trace", "open_trace"):
        from llmprobe.tracing import reader

        return getattr(reader, name)
    raise AttributeError(name)


__all__ = ["__version__", "read_trace", "open_trace"]
