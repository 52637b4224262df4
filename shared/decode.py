"""One token of DLA for every (row, head) on the CPU, compiled (`_decode.c`, built at install with the decision
scan when a C compiler is there): what `dla_torch.ops.step` and `dla_mlx.ops.step` run on the CPU when no
gradient is needed. The same computation as their ops step (DESIGN section 2) on the states' physical layout
(`dla_shared.state`): a token reads the K states once and writes only what changes (one state for the
diagonal transition, each state for the delta rule); not differentiable. `available()` says whether it was
built."""

from __future__ import annotations

import numpy as np

from . import policy
from .config import DLAConfig
from .state import check_permutation

try:
    from . import _decode
except ImportError:  # built without a C compiler: the backends keep their ops steps
    _decode = None


def available() -> bool:
    return _decode is not None


def decode(config: DLAConfig, scale: float, q, k, v, g, lam, beta, active, S, n, ibar, pos, opened, slot=None,
           decay=None, *, inplace: bool = False):
    """A [B, T] block, one token at a time; numpy arrays of one float dtype (float32 or float64; bookkeeping
    int64, ``ibar`` and ``decay`` in that dtype): q, k [B, T, H, Dk], v [B, T, H, Dv], g and beta (None: the
    diagonal transition) [B, T, H], lam [B, T, H, L], active bool [B, T], and a `DLAState`'s arrays: S
    [B, H, L, Dk, Dv], n, ibar [B, H, L], pos [B], opened [B, H], and slot [B, H, L] and decay [B, H] in the
    physical layout (None: the canonical one). Returns (o [B, T, H, Dv], S, n, ibar, pos, opened, slot,
    decay), the state in the physical layout: the bookkeeping in new arrays; the states in a new array, or
    with ``inplace`` in S itself (then a C-contiguous, writable array), which saves a copy of the K states
    where the caller made S its own."""
    B, H, L, Dk, Dv = S.shape
    T = np.shape(q)[1] if np.ndim(q) == 4 else 0
    dtype = S.dtype
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"S must be float32 or float64, got {dtype}")
    if inplace and not (S.flags.c_contiguous and S.flags.writeable):
        raise ValueError("inplace=True needs S C-contiguous and writable")
    expected = [("q", q, (B, T, H, Dk)), ("k", k, (B, T, H, Dk)), ("v", v, (B, T, H, Dv)), ("g", g, (B, T, H)),
                ("beta", beta, (B, T, H)), ("lam", lam, (B, T, H, L)), ("active", active, (B, T)),
                ("n", n, (B, H, L)), ("ibar", ibar, (B, H, L)), ("pos", pos, (B,)), ("opened", opened, (B, H)),
                ("slot", slot, (B, H, L)), ("decay", decay, (B, H))]
    if (slot is None) != (decay is None):
        raise ValueError("slot and decay come together (the physical layout) or not at all")
    for name, x, shape in expected:  # the C loop trusts these sizes
        if not (name in ("beta", "slot", "decay") and x is None) and np.shape(x) != shape:
            raise ValueError(f"{name} must have shape {list(shape)} for S of shape {list(S.shape)}, "
                             f"got {list(np.shape(x))}")
    if slot is not None:
        check_permutation(np.asarray(slot), "slot")
    policy.check_levels(config, int((pos + np.sum(active, axis=1)).max(initial=0)))
    c = lambda x, t=dtype: np.ascontiguousarray(x, t)
    S = S if inplace else np.array(S, order="C")
    if slot is None:  # the canonical layout
        slot, decay = np.broadcast_to(np.arange(L), (B, H, L)), np.ones((B, H), dtype)
    n, ibar, pos, opened, slot, decay = (np.array(x, t, order="C") for x, t in (
        (n, np.int64), (ibar, dtype), (pos, np.int64), (opened, np.int64), (slot, np.int64), (decay, dtype)))
    tau = np.ascontiguousarray(np.broadcast_to(np.asarray(config.threshold, np.float64), (H,)))
    o = np.empty((B, T, H, Dv), dtype)
    for t in range(T):
        o_t = np.empty((B, H, Dv), dtype)
        overflow = _decode.decode(
            policy.POLICY_IDS[config.policy], config.score == "state_drift", config.merge == "oldest", config.scored,
            dtype == np.float64, config.block_size, config.eps, float(scale), (B, H, Dk, Dv, L), c(q[:, t]),
            c(k[:, t]), c(v[:, t]), c(g[:, t]), b"" if beta is None else c(beta[:, t]), c(lam[:, t]),
            c(active[:, t], np.uint8), S, slot, decay, tau, n, ibar, pos, opened, o_t)
        if overflow:  # check_levels refuses it first; the loop stops at it too
            raise ValueError(f"policy='fenwick' with capacity={L} levels holds at most {2 ** (L - 1)} tokens; "
                             f"position {overflow} needs a larger DLAConfig.capacity")
        o[:, t] = o_t
    return o, S, n, ibar, pos, opened, slot, decay
