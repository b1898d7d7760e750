"""Terminal views: every result llmprobe prints, one view class per command that prints one.

A view wraps a command's result (a DataFrame, a fit, a dataclass) and gives it in each format
:meth:`llmprobe.cli.output.Output.result` writes: ``tables()`` for people (rich), ``rows()`` for
``--format tsv``, ``json()`` for ``--format json`` / ``--json``, and ``beside_data(fmt)``, what people
still see on stderr when stdout carries data. Views compute nothing; token strings are never
wrapped (their whitespace is the point).

* :mod:`.traces`: ``inspect`` (:class:`~.traces.TraceView`), ``models`` (:class:`~.traces.ModelsView`);
* :mod:`.fits`: ``fit-prior`` (:class:`~.fits.PriorView`), ``fit-posterior`` (:class:`~.fits.PosteriorView`);
* :mod:`.analyses`: ``continuity`` (:class:`~.analyses.ContinuityView`), ``martingale``
  (:class:`~.analyses.MartingaleView`).
"""
