"""The explorer: one self-contained page over a trace (and its fit), and the live probe that fills it.

* :mod:`.data` turns a trace (and a fit-posterior table, and a baseline trace) into the page's data
  model: compact, columnar, typed arrays in base64 (:mod:`.columns`), the token strings once;
* :mod:`.interventions` names a trace's interventions and puts its baseline trace beside it, checked
  to be the same prompts and tokens row by row;
* :mod:`.assets` holds the page's script and style sheet (inlined into every page);
* :mod:`.page` writes the HTML: the data as an escaped JSON block, a Content-Security-Policy that
  allows no network request, the verdict first;
* :mod:`.server` is ``llmprobe serve``: the same page, filled by a loaded model one request at a time.

Nothing here imports a model library: the server traces through :func:`llmprobe.api.trace_table`.
"""
