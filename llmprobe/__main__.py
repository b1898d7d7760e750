"""``python -m llmprobe``: the command line."""

from llmprobe.cli import main

main()
