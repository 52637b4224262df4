"""Chunkwise DLA in MLX ops: the mirror of `dla_torch.ops.chunk` (see its docstring for the algorithm).

The decisions come from `dla_shared.scan` on the host; the chunk math is MLX ops, differentiable. MLX has no
gradient for triangular solves, so the delta rule's unit lower-triangular T is inverted by forward
substitution (`_unit_lower_inverse`), which is plain matmuls.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from dla_shared.scan import scan
from dla_shared.state import DLAState, decay_floor

CHUNK = 64


def dla_chunk(q, k, v, g, lam, beta, mask, state: DLAState, *, config, scale, chunk_size=CHUNK, decide=None):
    """Run a [B, T] block from ``state``; return (o [B, T, H, Dv], final DLAState).

    ``decide`` computes the decisions (`host_scan` by default; the Metal impl passes `metal_scan`).
    """
    B, T, H, _ = q.shape
    # Padding arrives zeroed (`dla_attention`): an identity transition, no write, zero output.
    active = np.ones((B, T), bool) if mask is None else np.array(mask)
    sigma, book = (decide or host_scan)(config, k, v, g, beta, active, state, chunk_size)
    g = mx.maximum(g, decay_floor(mx.finfo(g.dtype).eps))  # the scan decided on g itself
    k, v, g, beta, poisoned = _contain(k, v, g, beta)
    L = state.S.shape[2]
    S, outputs = state.S, [mx.zeros((B, 0, H, v.shape[-1]), dtype=state.S.dtype)]
    chunks = [(c0, min(c0 + chunk_size, T)) for c0 in range(0, T, chunk_size)]
    for (c0, c1), reach in zip(chunks, _reach(sigma, chunks, L)):
        part = lambda x: None if x is None else x[:, c0:c1]
        o, S = _one_chunk(part(q), part(k), part(v), part(g), part(lam), part(beta), S,
                          sigma[:, :, c0:c1, : L + c1 - c0], scale, reach)
        outputs.append(o)
    o = mx.where(poisoned[..., None], mx.nan, mx.concatenate(outputs, axis=1))
    S = mx.where(poisoned[:, -1:].transpose(0, 2, 1)[..., None, None], mx.nan, S) if T else S
    return o, DLAState(S, *book)


def _contain(k, v, g, beta):
    """Zero the tokens whose k, v, g or beta is not finite; return them and ``poisoned`` bool [B, T, H],
    true from a head's first such token on, where the outputs and end states become NaN
    (`dla_torch.ops.chunk._contain`: the causal masks' zeros would multiply a NaN into earlier tokens)."""
    bad = ~(mx.isfinite(k).all(-1) & mx.isfinite(v).all(-1) & mx.isfinite(g))
    if beta is not None:
        bad = bad | ~mx.isfinite(beta)
    zero = lambda x: None if x is None else mx.where(bad.reshape(*bad.shape, *[1] * (x.ndim - 3)), 0, x)
    return *map(zero, (k, v, g, beta)), mx.cumsum(bad.astype(mx.int32), axis=1) > 0


def _reach(sigma, chunks, L) -> list[int]:
    """Per chunk, 1 + the largest slot that holds one of its tokens at its end (`dla_torch.ops.chunk._reach`)."""
    if not chunks:
        return []
    return (mx.max(sigma[:, :, mx.array([c1 - 1 for _, c1 in chunks]), L:], axis=(0, 1, 3)) + 1).tolist()


def host_scan(config, k, v, g, beta, active, state: DLAState, chunk_size):
    """The decisions (`dla_shared.scan`, on the host): ``sigma`` int32 [B, H, T, L + C] and the final
    bookkeeping (n, ibar, pos, opened). ``active`` is a numpy bool [B, T]."""
    host = lambda x: None if x is None else np.array(mx.stop_gradient(x))
    data = (k, v, g, beta) if config.scored else (None,) * 4  # unscored decisions read positions only
    sigma, (n, ibar, pos, opened) = scan(config, *map(host, data), active, host(state.S[:, :, 0]),
                                         host(state.n), host(state.ibar), host(state.pos), host(state.opened),
                                         chunk_size)
    book = (mx.array(n, dtype=mx.int64), mx.array(ibar, dtype=state.S.dtype), mx.array(pos, dtype=mx.int64),
            mx.array(opened, dtype=mx.int64))
    return mx.array(sigma.astype(np.int32)), book


def _one_chunk(q, k, v, g, lam, beta, S, sigma, scale, reach):
    """Outputs and end states of one chunk given its decisions (`dla_torch.ops.chunk._one_chunk`)."""
    L = S.shape[2]
    qh, kh, vh, lh = (x.transpose(0, 2, 1, 3) for x in (q, k, v, lam))  # [B, H, C, D]
    C = qh.shape[2]
    cum = mx.cumsum(g.transpose(0, 2, 1), axis=-1)  # log gamma  [B, H, C]
    causal = mx.tril(mx.ones((C, C), dtype=mx.bool_))
    ratio = mx.where(causal, mx.exp(mx.where(causal, cum[..., :, None] - cum[..., None, :], 0)), 0)
    gamma, end = mx.exp(cum), cum[..., -1:]
    to_end = mx.exp(end - cum)  # gamma_end / gamma_s
    qk = qh @ kh.swapaxes(-1, -2)
    if beta is None:
        A = mx.where(causal, ratio * qk, 0)
        q_start = gamma[..., None] * qh
        kappa = to_end[..., None] * kh
    else:
        bh = beta.transpose(0, 2, 1)
        strict = mx.tril(mx.ones((C, C), dtype=mx.bool_), -1)
        T_inv = _unit_lower_inverse(mx.eye(C, dtype=q.dtype) + mx.where(strict, ratio, 0) * bh[..., None, :]
                                    * (kh @ kh.swapaxes(-1, -2)))
        A = (ratio * bh[..., None, :] * qk) @ T_inv  # D T^-1
        q_start = gamma[..., None] * qh - A @ (gamma[..., None] * kh)
        kappa = T_inv.swapaxes(-1, -2) @ ((to_end * bh)[..., None] * kh)
    tok, car = sigma[..., L:], sigma[..., :L]  # [B, H, C, C], [B, H, C, L]
    lam_tok = mx.where(tok >= 0, mx.take_along_axis(lh, mx.maximum(tok, 0), axis=-1), 0)
    lam_car = mx.take_along_axis(lh, car, axis=-1)
    o = (lam_tok * A) @ vh + mx.einsum("bhji,bhjk,bhikv->bhjv", lam_car, q_start, S)
    # States at the chunk end: carried states moved (G S) then carried by P_end, plus the tokens.
    E = (tok[:, :, -1, None, :] == mx.arange(reach)[:, None]).astype(S.dtype)  # [B, H, reach, C]
    moved = _move(S, car[:, :, -1])
    if beta is None:
        carried = mx.exp(end)[..., None, None] * moved
    else:
        P_end = mx.exp(end)[..., None] * mx.eye(kh.shape[-1], dtype=q.dtype) - \
            kappa.swapaxes(-1, -2) @ (gamma[..., None] * kh)
        carried = mx.einsum("bhkl,bhmlv->bhmkv", P_end, moved)
    written = carried[:, :, :reach] + mx.einsum("bhms,bhsk,bhsv->bhmkv", E, kappa, vh)
    return scale * o.transpose(0, 2, 1, 3), mx.concatenate([written, carried[:, :, reach:]], axis=2)


def _move(S, dest):
    """G S: new slot m holds the sum of the carried states i with ``dest[i] == m``. S [B, H, L, Dk, Dv], dest
    int [B, H, L]. One scatter-add over the (row, head, slot) matrices: L times fewer operations than the
    product with the 0/1 matrix G (and MLX's CPU matmuls are slow)."""
    B, H, L = dest.shape
    rows = (dest + L * mx.arange(B * H).reshape(B, H, 1)).reshape(-1)
    flat = S.reshape(B * H * L, -1)
    return mx.zeros_like(flat).at[rows].add(flat).reshape(S.shape)


def _unit_lower_inverse(T):
    """T^-1 for unit lower-triangular T [..., C, C], row by row (forward substitution)."""
    C = T.shape[-1]
    eye = mx.eye(C, dtype=T.dtype)
    rows = mx.broadcast_to(eye[:1], T.shape[:-2] + (1, C))
    for i in range(1, C):
        row = eye[i] - (T[..., i : i + 1, :i] @ rows)[..., 0, :]
        rows = mx.concatenate([rows, row[..., None, :]], axis=-2)
    return rows
