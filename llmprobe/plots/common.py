"""What every figure shares: the headless backend, safe token labels, and atomic file output.

Figures are built as :class:`matplotlib.figure.Figure` objects without pyplot, and matplotlib is
switched to the Agg backend unless pyplot is already in use, so they render on machines without a
display. Figures are written through :func:`llmprobe.files.write_atomic`, so an error never leaves a
half-written image; the format follows the file extension.
"""

from __future__ import annotations

import base64
import io
import sys
import warnings
from pathlib import Path

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # a notebook that already chose its backend keeps it
    matplotlib.use("Agg")

from matplotlib.figure import Figure

from llmprobe.bayes.verdict import VERDICTS
from llmprobe.errors import UsageError
from llmprobe.files import check_new_output, write_atomic
from llmprobe.tracing.reader import visible

VERDICT_MARKERS = dict(zip(VERDICTS, ("o", "s", "X", "v"), strict=True))
"""One marker per fit-posterior verdict, the same in every figure that marks verdicts."""

IMAGE_FORMATS = ("png", "svg", "pdf")
DPI = 150
MAX_LABEL_CHARS = 12

# Tokens from any script reach the figures; a glyph DejaVu lacks is drawn as a box, not worth a warning.
warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)


def token_label(token: str | None, max_chars: int = MAX_LABEL_CHARS) -> str:
    """A token as figure text: whitespace visible, control characters escaped, ``$`` kept literal."""
    text = visible(token)
    text = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return text.replace("$", r"\$")


def plain_label(text: str) -> str:
    """Free text (model names, prompt ids) as figure text, with ``$`` kept literal."""
    return text.replace("$", r"\$")


def check_image_output(output: str, force: bool, inputs: list[str] = ()) -> str:
    """The image format for ``output`` (from its extension); fails before any work if it cannot be written."""
    path = Path(output)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in IMAGE_FORMATS:
        raise UsageError(f"unknown image extension {path.suffix!r} (expected .{', .'.join(IMAGE_FORMATS)})",
                         where=output)
    check_new_output(path, force, inputs=inputs)
    return fmt


def figure_bytes(fig: Figure, fmt: str = "png", dpi: int = DPI) -> bytes:
    buffer = io.BytesIO()
    metadata = {"Software": None} if fmt == "png" else {"Date": None} if fmt == "svg" else None
    fig.savefig(buffer, format=fmt, dpi=dpi, bbox_inches="tight", pad_inches=0.15, metadata=metadata)
    return buffer.getvalue()


def save_figure(fig: Figure, output: str, *, replace: bool = False) -> None:
    """Save ``fig`` to ``output``, format by extension (check it first with :func:`check_image_output`)."""
    path = Path(output)
    write_atomic(path, figure_bytes(fig, path.suffix.lower().lstrip(".")), replace=replace)


def data_uri(fig: Figure, fmt: str = "png", dpi: int = DPI) -> str:
    """The figure as a ``data:`` URI, for HTML that must not reference any other file."""
    mime = {"png": "image/png", "svg": "image/svg+xml"}[fmt]
    return f"data:{mime};base64,{base64.b64encode(figure_bytes(fig, fmt, dpi)).decode('ascii')}"
