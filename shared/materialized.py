"""The second oracle: DLA in its O(T^2) materialized form (DESIGN section 2).

Since every state takes the same transition and merges are sums,
``o_t = scale * sum_{s <= t} lam_t[slot_t(s)] * A[t, s] * v_s``, where ``A`` is the base model's own
attention matrix, ``A[t, s] = q_t^T P(s+1..t) k_s beta_s`` with ``P(s+1..t) = M_t ... M_{s+1}`` and
``M_j = exp(g_j) (I - beta_j k_j k_j^T)`` (just ``exp(G_t - G_s)`` for the diagonal transition), and
``slot_t(s)`` comes from the cache's decisions (`Trace.slot_map`). Float64 numpy, from an empty cache;
padding through ``mask``. Shapes as in `dla_shared.oracle`.
"""

from __future__ import annotations

import numpy as np

from .oracle import inspect


def base_attention(q, k, g, beta=None) -> np.ndarray:
    """The single-state base model's attention matrix A [T, T] (lower triangular) for one head:
    q, k [T, Dk], g [T] log decay, beta [T] or None (diagonal transition)."""
    T = len(q)
    if beta is None:
        G = np.cumsum(g)
        decay = np.exp(np.tril(G[:, None] - G[None, :]))
        return np.tril(decay * (q @ k.T))
    A = np.zeros((T, T))
    carried = np.zeros((0, k.shape[1]))  # row s: P(s+1..t) k_s beta_s
    for t in range(T):
        carried = np.exp(g[t]) * (carried - beta[t] * np.outer(carried @ k[t], k[t]))
        carried = np.vstack([carried, beta[t] * k[t]])
        A[t, : t + 1] = carried @ q[t]
    return A


def materialized_attention(q, k, v, g, lam=None, beta=None, *, config, scale=1.0, mask=None) -> np.ndarray:
    """o [B, T, H, Dv] (float64) as the base attention matrix masked by lam_t[slot_t(s)]."""
    q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
    beta = None if beta is None else np.asarray(beta, np.float64)
    trace = inspect(q, k, v, g, beta, config=config, mask=mask)
    B, T, H, _ = q.shape
    lam = np.ones((B, T, H, config.num_slots)) if lam is None else np.asarray(lam, np.float64)
    o = np.zeros(v.shape)
    for b in range(B):
        idx = np.flatnonzero(trace.pos[b] >= 0)
        for h in range(H):
            A = base_attention(q[b, idx, h], k[b, idx, h], g[b, idx, h], None if beta is None else beta[b, idx, h])
            slots = trace.slot_map(b, h)
            weights = np.where(slots >= 0, np.take_along_axis(lam[b, idx, h], np.maximum(slots, 0), axis=1), 0)
            o[b, idx, h] = scale * (weights * A) @ v[b, idx, h]
    return o
