"""The random streams of an experiment: which outcomes (and cues) a sequence draws.

A sequence draws from a *schedule*: one endless phase for a plain θ, or a chain of phases (θ = 0.75
for 20 draws, then 0.25 ...). Outcome j is drawn from the phase it falls in, by inverting that θ's
cumulative distribution at one uniform number.

Invariants: each stream is a ``numpy.random.SeedSequence`` keyed by the seed, the *value* of θ (or of
the phases: each phase's θ and length), the replicate and an optional suffix (a template's own draws,
a per-n prompt's independent draws). So adding, removing or reordering θs, templates, sequences or
examples leaves every existing sequence unchanged, and a longer sequence extends a shorter one (one
uniform per outcome). Outcomes and cues come from two separate streams, so a template with cues draws
the same outcomes as one without. numpy only.
"""

from __future__ import annotations

import struct

import numpy as np

__all__ = ["Phase", "phase_of", "sample_outcomes", "schedule_key", "streams"]

Phase = tuple[tuple[float, ...], int]  # (θ, number of draws); the last phase of a plain θ never ends


def _theta_key(theta: tuple[float, ...]) -> tuple[int, ...]:
    """θ as fixed-width 32-bit words (two per float64), so distinct θs give distinct keys."""
    words: list[int] = []
    for x in theta:
        bits = struct.unpack("<Q", struct.pack("<d", x))[0]
        words += [bits & 0xFFFFFFFF, bits >> 32]
    return tuple(words)


def schedule_key(schedule: tuple[Phase, ...]) -> tuple[int, ...]:
    """A plain θ keys as itself (the original streams); a chain as each phase's θ words and length."""
    if len(schedule) == 1 and schedule[0][1] < 0:
        return _theta_key(schedule[0][0])
    return tuple(word for theta, n in schedule for word in (*_theta_key(theta), n))


def streams(seed: int, key: tuple[int, ...], replicate: int,
            extra: tuple[int, ...] = ()) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent outcome and cue generators for one (θ, replicate), keyed by θ's *value*.

    spawn_key = (replicate, stream, *float64 bits of θ as 32-bit words, *extra): a sequence depends only on the
    seed, θ and its replicate number, so adding, removing or reordering θs, raising `sequences` or raising
    `n_max` (outcomes are drawn one uniform at a time, so a longer sequence extends a shorter one)
    leaves every existing sequence unchanged. ``extra`` is empty for the original form and nested draws;
    (2, template) gives a template its own draws, (3, n) a per-n prompt its own (independent draws), and a
    trailing (4,) the shuffled orders of a sequence (``experiment.permutations``).
    The θ words have a fixed count, so the suffixes cannot collide with each other.
    """
    outcome_ss = np.random.SeedSequence(seed, spawn_key=(replicate, 0, *key, *extra))
    cue_ss = np.random.SeedSequence(seed, spawn_key=(replicate, 1, *key, *extra))
    return np.random.default_rng(outcome_ss), np.random.default_rng(cue_ss)


def phase_of(schedule: tuple[Phase, ...], j: int) -> int:
    """Which phase draws outcome j (past the end of a chain: its last phase)."""
    for p, (_, n) in enumerate(schedule):
        if n < 0 or j < n:
            return p
        j -= n
    return len(schedule) - 1


def sample_outcomes(rng: np.random.Generator, schedule: tuple[Phase, ...], n: int) -> list[int]:
    """``n`` category indices, outcome j drawn from the θ of the phase it falls in."""
    u = rng.random(n)
    phase = np.array([phase_of(schedule, j) for j in range(n)], dtype=np.int64)
    out = np.zeros(n, dtype=np.int64)
    for p, (theta, _) in enumerate(schedule):
        at = phase == p
        probs = np.asarray(theta, dtype=np.float64)
        cdf = np.cumsum(probs / probs.sum())
        cdf[-1] = 1.0
        # u < 1 and cdf[-1] == 1, so idx < K; categories with θ_k == 0 have an empty interval.
        out[at] = np.minimum(np.searchsorted(cdf, u[at], side="right"), len(theta) - 1)
    return [int(i) for i in out]
