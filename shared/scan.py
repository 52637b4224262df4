"""The decision scan of the chunkwise paths, in numpy: every backend's chunk path runs it on the host
(the Triton kernel in `dla_torch.ops.triton.scan` mirrors it line for line).

The score needs only the newest state, so one pass over the tokens carries that state alone (the
single-state recurrence, O(Dk Dv) per token) and `dla_shared.policy` turns the scores into decisions.
"""

from __future__ import annotations

import numpy as np

from . import policy
from .config import DLAConfig


def scan(config: DLAConfig, k, v, g, beta, active, X, n, ibar, pos, opened, chunk_size: int):
    """Decide every token of a [B, T] block.

    k [B, T, H, Dk], v [B, T, H, Dv], g and beta (or None) [B, T, H], active bool [B, T]; X [B, H, Dk, Dv]
    the newest state (slot 0) before the block, n / ibar [B, H, L], pos [B] and opened [B, H] the
    bookkeeping (`DLAState`); a per-head ``config.threshold`` has H values. Computes in X's dtype. Returns
    ``sigma`` int16 [B, H, T, L + C]: after token t, the slot of each state carried into t's chunk
    (columns < L) and of each of the chunk's tokens (column L + s; -1 until written); and the bookkeeping
    (n, ibar, pos, opened) after the block.
    """
    B, T, H, _ = k.shape
    L, C = n.shape[-1], chunk_size
    dtype = X.dtype
    k, v, g = (np.asarray(x, dtype) for x in (k, v, g))
    beta = None if beta is None else np.asarray(beta, dtype)
    size = X.shape[-1] * X.shape[-2]
    sigma = np.full((B, H, T, L + C), -1, np.int16)
    for t in range(T):
        if t % C == 0:  # a new chunk: carried states sit in their own slots, no token yet
            slot_of = np.concatenate([np.broadcast_to(np.arange(L), (B, H, L)), np.full((B, H, C), -1)], -1)
        kt, vt = k[:, t], v[:, t]
        token = kt[..., :, None] * vt[..., None, :]
        decay = np.exp(g[:, t])[..., None, None]
        if beta is None:
            S_new = decay * X  # S~, the newest state after the transition, before the write
        else:
            bt = beta[:, t, :, None, None]
            S_new = decay * (X - bt * kt[..., :, None] * (kt[..., None, :] @ X))
            token = bt * token
        terms = [(S_new * S_new).sum((-2, -1)), (token * token).sum((-2, -1)), (S_new * token).sum((-2, -1))]
        score = policy.score_from_terms(config, *terms, size)
        on = active[:, t]
        plan = policy.plan(config, n, ibar, pos, score, on)
        opened = opened + (plan.opened & (pos > 0)[:, None])
        n, ibar, pos = plan.n, plan.ibar, plan.pos
        X_new = np.where(plan.opened[..., None, None], token, S_new + token)
        X = np.where(on[:, None, None, None], X_new, X)
        moved = np.take_along_axis(plan.dest, np.maximum(slot_of, 0), axis=-1)
        slot_of = np.where(slot_of >= 0, moved, -1)
        slot_of[on, :, L + t % C] = 0
        sigma[:, :, t] = slot_of
    return sigma, (n, ibar, pos, opened)
