"""The decision scan of the chunkwise paths: every backend's chunk path runs it on the host (the Triton
kernel in `dla_torch.ops.triton.scan` and the Metal kernel in `metal_kernels/dla_scan.metal` mirror it line
for line).

The score needs only the newest state, so one pass over the tokens carries that state alone (the
single-state recurrence, O(Dk Dv) per token) and `dla_shared.policy` turns the scores into decisions. Where
no decision reads a score (`DLAConfig.scored`: single, fenwick, fixed with oldest merges) the pass carries
nothing and the decisions follow from the positions alone.
`scan_numpy` is that pass in numpy, the readable reference; `_scan.c` is the same loop compiled, an
optional extension built at install (`setup.py`), which `scan` uses when it is there.
"""

from __future__ import annotations

import numpy as np

from . import policy
from .config import DLAConfig

try:
    from . import _scan
except ImportError:  # built without a C compiler: the numpy loop
    _scan = None


def scan(config: DLAConfig, k, v, g, beta, active, X, n, ibar, pos, opened, chunk_size: int):
    """`scan_numpy`'s decisions and bookkeeping, from the compiled loop when it is built and the state's
    dtype is float32 or float64 (the numpy loop otherwise)."""
    dtype = np.asarray(X).dtype
    if _scan is None or dtype not in (np.float32, np.float64) or np.asarray(ibar).dtype != dtype:
        return scan_numpy(config, k, v, g, beta, active, X, n, ibar, pos, opened, chunk_size)
    return _compiled(config, k, v, g, beta, active, X, n, ibar, pos, opened, chunk_size)


def _compiled(config, k, v, g, beta, active, X, n, ibar, pos, opened, chunk_size):
    (B, T), (H, L), (Dk, Dv) = np.shape(active), np.shape(n)[1:], np.shape(X)[-2:]
    dtype = np.asarray(X).dtype
    c = lambda x, t=dtype: b"" if x is None else np.ascontiguousarray(x, t)  # b"": not read
    k, v, g, beta = (c(x) if config.scored else b"" for x in (k, v, g, beta))
    X = np.array(X, dtype, order="C")  # a copy the loop may overwrite
    n_out, opened_out = np.array(n, np.int64, order="C"), np.array(opened, np.int64, order="C")
    ibar_out = np.array(ibar, dtype, order="C")
    tau = np.ascontiguousarray(np.broadcast_to(np.asarray(config.threshold, np.float64), (H,)))
    sigma = np.empty((B, H, T, L + chunk_size), np.int16)
    overflow = _scan.scan(policy.POLICY_IDS[config.policy], config.score == "state_drift",
                          config.merge == "oldest", config.scored, dtype == np.float64, config.block_size, config.eps,
                          (B, T, H, Dk, Dv, L, chunk_size), k, v, g, beta, c(active, np.uint8), X, tau,
                          n_out, ibar_out, c(pos, np.int64), opened_out, sigma)
    if overflow:
        raise ValueError(f"policy='fenwick' with capacity={L} levels holds at most {2 ** (L - 1)} tokens; "
                         f"position {overflow} needs a larger DLAConfig.capacity")
    pos = np.asarray(pos)
    return sigma, (n_out.astype(np.asarray(n).dtype), ibar_out, pos + np.asarray(active).sum(-1).astype(pos.dtype),
                   opened_out.astype(np.asarray(opened).dtype))


def scan_numpy(config: DLAConfig, k, v, g, beta, active, X, n, ibar, pos, opened, chunk_size: int):
    """Decide every token of a [B, T] block.

    k [B, T, H, Dk], v [B, T, H, Dv], g and beta (or None) [B, T, H], active bool [B, T]; X [B, H, Dk, Dv]
    the newest state (slot 0) before the block, n / ibar [B, H, L], pos [B] and opened [B, H] the
    bookkeeping (`DLAState`); a per-head ``config.threshold`` has H values. Where no decision reads a score
    (not ``config.scored``) k, v, g and beta are not read and may be None. Computes in X's dtype. Returns
    ``sigma`` int16 [B, H, T, L + C]: after token t, the slot of each state carried into t's chunk
    (columns < L) and of each of the chunk's tokens (column L + s; -1 until written); and the bookkeeping
    (n, ibar, pos, opened) after the block.
    """
    (B, T), (H, L), C = np.shape(active), np.shape(n)[1:], chunk_size
    dtype = X.dtype
    k, v, g, beta = (None if x is None else np.asarray(x, dtype) for x in (k, v, g, beta))
    size = X.shape[-1] * X.shape[-2]
    sigma = np.full((B, H, T, L + C), -1, np.int16)
    for t in range(T):
        if t % C == 0:  # a new chunk: carried states sit in their own slots, no token yet
            slot_of = np.concatenate([np.broadcast_to(np.arange(L), (B, H, L)), np.full((B, H, C), -1)], -1)
        on = active[:, t]
        if config.scored:
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
        else:  # the decisions read no score: no pass over the data
            score = np.zeros((B, H), dtype)
        plan = policy.plan(config, n, ibar, pos, score, on)
        opened = opened + (plan.opened & (pos > 0)[:, None])
        n, ibar, pos = plan.n, plan.ibar, plan.pos
        if config.scored:
            X_new = np.where(plan.opened[..., None, None], token, S_new + token)
            X = np.where(on[:, None, None, None], X_new, X)
        moved = np.take_along_axis(plan.dest, np.maximum(slot_of, 0), axis=-1)
        slot_of = np.where(slot_of >= 0, moved, -1)
        slot_of[on, :, L + t % C] = 0
        sigma[:, :, t] = slot_of
    return sigma, (n, ibar, pos, opened)
