"""Figures: token heatmaps (:mod:`.tokens`), in-context learning curves (:mod:`.icl`), fitted priors (:mod:`.prior`).

Each module reads its input, returns the numbers it draws (so tests and notebooks can check them)
and builds a matplotlib Figure without pyplot; :mod:`.common` sets the headless backend and writes
files atomically.
"""
