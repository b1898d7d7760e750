"""llmprobe's version: the one source (pyproject.toml reads it; ``llmprobe.__version__`` re-exports it).

A module of its own, at the bottom of the house, so that the rooms that record the version (a trace's
metadata, the report, ``--version``) import it without importing the ``llmprobe`` package above them.
"""

__version__ = "0.1.0"
