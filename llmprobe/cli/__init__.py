"""The command line: a thin layer that parses options, delegates to the library and shows results.

Nothing outside ``llmprobe.cli`` imports it; it is the only place that knows typer or rich.
"""

from llmprobe.cli.app import app, main

__all__ = ["app", "main"]
