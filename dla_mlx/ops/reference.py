"""The exact MLX reference: DESIGN section 2 token by token, vectorized over rows and heads.

Mirrors `dla_torch.ops.reference` line for line. Differentiable in q, k, v, g, beta, lam and the initial
states; the cache decisions (piecewise constant) come from `dla_shared.policy` on the host, from the
score's three scalars. Shapes as in `dla_mlx.dla_attention`; states are float32 (float64 for float64
inputs, CPU only) in the layout of `DLAState`.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from dla_shared import policy
from dla_shared.state import DLAState


def dla_reference(q, k, v, g, lam, beta, mask, state: DLAState, *, config, scale):
    """Run a [B, T] block from ``state`` (batch B); return (o [B, T, H, Dv], final DLAState)."""
    B, T, H, _ = q.shape
    S = state.S
    n, ibar, pos, opened = (np.array(x) for x in (state.n, state.ibar, state.pos, state.opened))
    size = S.shape[-1] * S.shape[-2]
    active = np.ones((B, T), bool) if mask is None else np.array(mask)
    outputs = []
    for t in range(T):
        S_old = S
        S = mx.exp(g[:, t])[..., None, None, None] * _transition(S, k[:, t], None if beta is None else beta[:, t])
        b_t = 1.0 if beta is None else beta[:, t, :, None, None]
        token = b_t * k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, Dk, Dv]
        newest = mx.stop_gradient(S[:, :, 0])
        token_ = mx.stop_gradient(token)
        terms = [(newest * newest).sum((-2, -1)), (token_ * token_).sum((-2, -1)), (newest * token_).sum((-2, -1))]
        score = policy.score_from_terms(config, *(np.array(x) for x in terms), size)
        plan = policy.plan(config, n, ibar, pos, score, active[:, t])  # a per-head threshold meets score's heads
        opened = opened + (plan.opened & (pos > 0)[:, None])  # a sequence's first token is no boundary
        n, ibar, pos = plan.n, plan.ibar, plan.pos
        S = _move(S, plan.dest)
        S = mx.concatenate([(S[:, :, 0] + token)[:, :, None], S[:, :, 1:]], axis=2)
        on = mx.array(active[:, t])
        S = mx.where(on[:, None, None, None, None], S, S_old)
        o = scale * mx.einsum("bhl,bhk,bhlkv->bhv", lam[:, t].astype(S.dtype), q[:, t].astype(S.dtype), S)
        outputs.append(mx.where(on[:, None, None], o, 0))  # padding may hold NaN
    o = mx.stack(outputs, axis=1) if outputs else mx.zeros((B, 0, H, S.shape[-1]), dtype=S.dtype)
    final = DLAState(S, mx.array(n, dtype=mx.int64), mx.array(ibar, dtype=S.dtype), mx.array(pos, dtype=mx.int64),
                     mx.array(opened, dtype=mx.int64))
    return o, final


def _move(S, dest):
    """Every state to its new slot, states that merge summed: ``new[dest[j]] += S[j]`` per (row, head), O(L)
    states touched (a 0/1 transfer matrix would be O(L^2)). dest int [B, H, L] (`dla_shared.policy.Plan`)."""
    B, H, _ = dest.shape
    rows, heads = mx.arange(B)[:, None, None], mx.arange(H)[None, :, None]
    return mx.zeros_like(S).at[rows, heads, mx.array(dest)].add(S)


def _transition(S, k, beta):
    """(I - beta k k^T) S for every state; S unchanged for the diagonal transition. k [B, H, Dk]."""
    if beta is None:
        return S
    kS = mx.einsum("bhk,bhlkv->bhlv", k, S)
    return S - beta[..., None, None, None] * k[:, :, None, :, None] * kS[:, :, :, None, :]
