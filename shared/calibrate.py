"""Per-head thresholds for a target boundary rate (DESIGN section 2), backend-neutral, in numpy.

A head's open rate is the share of tokens after each sequence's first that open a state (what
`DLAState.opened` counts). It falls as the threshold rises, but not as a quantile of fixed scores: under
``state_drift`` a boundary changes the newest state and with it every later score. So the search runs
the real decisions (`dla_shared.scan.scan`, every head at once with per-head thresholds) and bisects
each head's threshold in log space.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .config import DLAConfig
from .scan import scan

# These bracket every reachable rate: scores are mostly O(1), but reach 1e7 on trained models where a head's
# decay has nearly emptied the newest state (Eq. 13's denominator ||R(S~)|| is then tiny).
LOW, HIGH = 1e-6, 1e12


def open_rates(config: DLAConfig, k, v, g, beta=None, mask=None, chunk_size: int = 64) -> np.ndarray:
    """Each head's open rate over a batch of sequences that start empty: float64 [H].

    k [B, T, H, Dk], v [B, T, H, Dv], g and beta (or None) [B, T, H], mask [B, T] bool (False = padding)
    or None; ``config.threshold`` a number or one per head.
    """
    B, T, H, Dk = k.shape
    active = np.ones((B, T), bool) if mask is None else np.asarray(mask, bool)
    L = config.num_slots
    X = np.zeros((B, H, Dk, v.shape[-1]))
    _, (_, _, pos, opened) = scan(config, k, v, g, beta, active, X, np.zeros((B, H, L), np.int64),
                                  np.zeros((B, H, L)), np.zeros(B, np.int64), np.zeros((B, H), np.int64),
                                  chunk_size)
    tokens = np.maximum(pos - 1, 0).sum()
    return opened.sum(0) / max(tokens, 1)


def fit_thresholds(config: DLAConfig, rate: float, k, v, g, beta=None, mask=None, steps: int = 20,
                   progress=None) -> tuple[np.ndarray, np.ndarray]:
    """The threshold of every head whose open rate over the given sequences is closest to ``rate``.

    Inputs as in `open_rates` (a ``policy="dla"`` config). Returns (thresholds float64 [H], their rates
    [H]). ``progress(i)`` is called after each of the ``steps`` bisection steps.
    """
    if config.policy != "dla":
        raise ValueError(f"thresholds only matter for policy='dla', got policy={config.policy!r}")
    if not 0 < rate < 1:
        raise ValueError(f"rate must be in (0, 1), got {rate!r}")
    H = k.shape[2]
    lo, hi = np.full(H, np.log(LOW)), np.full(H, np.log(HIGH))
    best, best_rate = np.full(H, np.nan), np.full(H, np.nan)
    for i in range(steps):
        mid = (lo + hi) / 2
        got = open_rates(dataclasses.replace(config, threshold=tuple(np.exp(mid))), k, v, g, beta, mask)
        closer = ~(np.abs(got - rate) >= np.abs(best_rate - rate))  # NaN (no best yet) counts as farther
        best, best_rate = np.where(closer, np.exp(mid), best), np.where(closer, got, best_rate)
        too_many = got > rate  # too many boundaries: raise the threshold
        lo, hi = np.where(too_many, mid, lo), np.where(too_many, hi, mid)
        if progress is not None:
            progress(i)
    return best, best_rate
