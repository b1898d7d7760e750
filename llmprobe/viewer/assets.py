"""The explorer page's script and style sheet, inlined into every page (no file to fetch, no library).

They live beside this module as plain files (``static/explorer.js``, ``static/explorer.css``: package
data, so editors and linters see JavaScript and CSS) and are read once, on import.

The script reads the data model (:mod:`llmprobe.viewer.data`) from the page's JSON block and draws:
a prompt picker, the prompt as a strip of tokens, the detail panel of the selected position, the
fit panel with its chart (plain SVG), and the logit-lens grid. Every string from the data reaches
the page through ``textContent`` or ``setAttribute`` (never markup); links are built from numbers.

Stable hooks for scripts and tests: ``[data-prompt-id]`` on the strip, ``[data-position]`` on each
token; in the detail panel one ``tr[data-token][data-prob]`` per top-k candidate (``data-prob`` is
``exp`` of the traced log-probability at full double precision), ``[data-entropy]`` (bits, full
precision), ``[data-next-prob]``/``[data-next-rank]``, ``tr[data-target]`` with ``data-prob`` (first
token) and ``data-seq-prob`` (whole string, at marks); in the fit panel ``tr[data-category]`` with
``data-model-prob``/``data-bayes-prob``/``data-theta`` and ``[data-kl-bits]``; in the lens grid
``td[data-layer][data-position]``. With a baseline trace (``view --baseline``): ``#interventions`` and
``#baseline-line`` under the title; in the detail panel the baseline's top-k as
``#baseline-topk tr[data-token][data-baseline-prob]`` beside the trace's ``#topk``,
``[data-baseline-entropy]``, ``[data-baseline-next-prob]``/``[data-baseline-next-rank]``,
``[data-delta-next-prob]`` (the trace's probability of the next token minus the baseline's),
``[data-change-kl-bits]`` (the lower bound on KL(baseline‖trace), :mod:`llmprobe.analysis.shift`), and
``data-baseline-prob``/``data-baseline-seq-prob`` on ``tr[data-target]``; in the fit panel ``data-baseline-prob`` on
``tr[data-category]``. ``#color-by`` then offers ``kl`` and ``delta`` besides ``surprisal`` and ``entropy``. ``window.llmprobeView`` exposes ``selectPrompt(i)``,
``selectPosition(p)``, ``state`` and ``timings`` (``ready``: ms from navigation start until the first
panel was drawn; ``lastSelect``: ms the last selection took).
"""

from importlib.resources import files

_STATIC = files("llmprobe.viewer").joinpath("static")
SCRIPT = _STATIC.joinpath("explorer.js").read_text(encoding="utf-8")
STYLE = _STATIC.joinpath("explorer.css").read_text(encoding="utf-8")
