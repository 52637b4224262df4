"""Chunkwise DLA in pure PyTorch (DESIGN section 3): a scalar scan decides, matmuls compute.

For each chunk of C tokens (the last may be shorter), with the K carried states S_i at its start:

1. **Scan** (no gradient). The score needs three scalars of the newest state S~_t. They follow from the
   chunk's key Gram matrix and the reads ``S_newest^T k_u`` of the carried newest state by a token-by-token
   update over the chunk (O(C^2 Dv) per chunk); `dla_shared.policy` turns them into decisions, recorded as
   ``sigma[t, x]``: the slot, after token t, of carried state x (x < L) or of chunk token x - L (-1 if
   not written yet).
2. **Math** (differentiable). Per chunk, with ``gamma_j = exp(cumsum g)`` and for the delta rule the
   triangular ``T[j, s] = delta_js + [s < j] (gamma_j / gamma_s) beta_s k_j.k_s`` (the UT transform):
   ``A = D T^-1`` is the base model's attention matrix inside the chunk (D its decay-masked q.k beta),
   ``q~ = Gamma q - A Gamma k`` are the queries carried back to the chunk start (P(c0..t)^T q_t), and
   ``kappa = T^-T W`` (W_s = (gamma_end / gamma_s) beta_s k_s) the keys carried to the chunk end. Then
   ``o_t = scale (sum_s lam_t[slot_t(s)] A[t, s] v_s + sum_i lam_t[slot_t(i)] q~_t^T S_i)`` and the states
   at the chunk end are ``P_end (G S) + E (kappa v^T)``, G and E the 0/1 maps of carried states and tokens
   to end slots, ``P_end = gamma_end I - kappa^T Gamma K``. The diagonal transition is T = I.

Backward is autograd through the math, recomputed per segment of chunks (`torch.utils.checkpoint`), so
that only one set of K states per segment is kept, not one per chunk. Shapes as in `dla_torch.dla_attention`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from dla_shared import policy
from dla_shared.state import DLAState

CHUNK = 64


def dla_chunk(q, k, v, g, lam, beta, mask, state: DLAState, *, config, scale, chunk_size=CHUNK):
    """Run a [B, T] block from ``state``; return (o [B, T, H, Dv], final DLAState)."""
    B, T, H, _ = q.shape
    # Padding arrives zeroed (`dla_attention`): an identity transition, no write, zero output.
    active = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.cpu()
    book = (state.n.numpy().copy(), state.ibar.numpy().copy(), state.pos.numpy().copy())
    bounds = list(range(0, T, chunk_size)) + [T]
    chunks = list(zip(bounds[:-1], bounds[1:]))

    # Decide chunk by chunk (the scan needs each chunk's start states); without gradients this is all.
    sigmas, outputs, S = [], [], state.S
    with torch.no_grad():
        for c0, c1 in chunks:
            sigma, book = _scan(config, k[:, c0:c1], v[:, c0:c1], g[:, c0:c1], _part(beta, c0, c1),
                                active[:, c0:c1].numpy(), S[:, :, 0], book)
            o, S = _math(q[:, c0:c1], k[:, c0:c1], v[:, c0:c1], g[:, c0:c1], lam[:, c0:c1],
                         _part(beta, c0, c1), S, sigma, scale)
            sigmas.append(sigma)
            outputs.append(o)
    if _needs_grad(q, k, v, g, lam, beta, state.S):
        # Again with gradients, keeping the states only at the start of each segment of sqrt(#chunks).
        outputs, S = [], state.S
        per = max(1, math.isqrt(len(chunks)))
        for first in range(0, len(chunks), per):
            seg = chunks[first : first + per]
            s0, s1 = seg[0][0], seg[-1][1]
            o, S = checkpoint(_run_chunks, q[:, s0:s1], k[:, s0:s1], v[:, s0:s1], g[:, s0:s1], lam[:, s0:s1],
                              _part(beta, s0, s1), S, [(a - s0, b - s0) for a, b in seg],
                              sigmas[first : first + per], scale, use_reentrant=False)
            outputs.append(o)
    o = torch.cat(outputs, dim=1) if outputs else q.new_zeros(B, 0, H, v.shape[-1])
    n, ibar, pos = book
    return o, DLAState(S, torch.from_numpy(n), torch.from_numpy(ibar), torch.from_numpy(pos))


def _run_chunks(q, k, v, g, lam, beta, S, chunks, sigmas, scale):
    outputs = []
    for (c0, c1), sigma in zip(chunks, sigmas):
        o, S = _math(q[:, c0:c1], k[:, c0:c1], v[:, c0:c1], g[:, c0:c1], lam[:, c0:c1], _part(beta, c0, c1),
                     S, sigma, scale)
        outputs.append(o)
    return torch.cat(outputs, dim=1), S


def _scan(config, k, v, g, beta, active, newest, book):
    """Decisions for one chunk. k [B, C, H, Dk], v [B, C, H, Dv], g/beta [B, C, H], active bool
    [B, C] (numpy), newest [B, H, Dk, Dv] the carried slot 0; book = (n, ibar, pos) numpy.
    Returns sigma int64 [B, H, C, L + C] and the bookkeeping after the chunk."""
    B, C, H, _ = k.shape
    n, ibar, pos = book
    L = n.shape[-1]
    kh, vh = k.transpose(1, 2), v.transpose(1, 2)  # [B, H, C, D]
    bh = torch.ones(B, H, C, dtype=k.dtype) if beta is None else beta.transpose(1, 2)
    gram = kh @ kh.transpose(-1, -2)  # k_u . k_t  [B, H, C, C]
    k_sq, v_sq = (kh * kh).sum(-1), (vh * vh).sum(-1)
    # X: the newest state after the last write; xk[u] = X^T k_u for every chunk token u.
    xk = torch.einsum("bhkv,bhuk->bhuv", newest, kh)
    x_sq = (newest * newest).sum((-2, -1))
    size = newest.shape[-1] * newest.shape[-2]
    slot_of = np.concatenate([np.broadcast_to(np.arange(L), (B, H, L)), np.full((B, H, C), -1)], axis=-1)
    sigma = np.empty((B, H, C, L + C), np.int64)
    for t in range(C):
        decay, b_t = torch.exp(g[:, t]), bh[:, :, t]
        xk_t = xk[:, :, t]
        if beta is None:  # S~ = exp(g) X
            state_sq = decay**2 * x_sq
            w = decay[..., None, None] * xk
        else:  # S~ = exp(g) (I - beta k k^T) X
            state_sq = decay**2 * (x_sq - b_t * (2 - b_t * k_sq[:, :, t]) * (xk_t * xk_t).sum(-1))
            w = decay[..., None, None] * (xk - b_t[..., None, None] * gram[:, :, t, :, None] * xk_t[:, :, None])
        cross = b_t * (w[:, :, t] * vh[:, :, t]).sum(-1)
        token_sq = b_t**2 * k_sq[:, :, t] * v_sq[:, :, t]
        score = policy.score_from_terms(config, *(x.cpu().numpy() for x in (state_sq, token_sq, cross)), size)
        plan = policy.plan(config, n, ibar, pos, score, active[:, t])
        n, ibar, pos = plan.n, plan.ibar, plan.pos
        # Where a state opened, X restarts from the token; else the token adds to S~.
        opened = torch.from_numpy(plan.opened).to(k.device)
        write = b_t[..., None, None] * gram[:, :, t, :, None] * vh[:, :, t, None, :]  # (k_t.k_u) beta v_t
        new_sq = torch.where(opened, token_sq, state_sq + token_sq + 2 * cross)
        new_xk = torch.where(opened[..., None, None], write, w + write)
        on = torch.from_numpy(active[:, t]).to(k.device)[:, None]
        x_sq = torch.where(on, new_sq, x_sq)
        xk = torch.where(on[..., None, None], new_xk, xk)
        moved = np.take_along_axis(plan.dest, np.maximum(slot_of, 0), axis=-1)
        slot_of = np.where(slot_of >= 0, moved, -1)
        slot_of[active[:, t], :, L + t] = 0
        sigma[:, :, t] = slot_of
    return torch.from_numpy(sigma), (n, ibar, pos)


def _math(q, k, v, g, lam, beta, S, sigma, scale):
    """Outputs and end states of one chunk given its decisions (see the module docstring)."""
    L = S.shape[2]
    qh, kh, vh, lh = (x.transpose(1, 2) for x in (q, k, v, lam))  # [B, H, C, D]
    C = qh.shape[2]
    cum = torch.cumsum(g.transpose(1, 2), dim=-1)  # log gamma  [B, H, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    ratio = torch.exp(torch.where(causal, cum[..., :, None] - cum[..., None, :], -math.inf))  # gamma_j / gamma_s
    gamma, end = torch.exp(cum), cum[..., -1:]
    to_end = torch.exp(end - cum)  # gamma_end / gamma_s
    if beta is None:
        A = ratio * (qh @ kh.transpose(-1, -2))
        q_start = gamma[..., None] * qh
        kappa = to_end[..., None] * kh
    else:
        bh = beta.transpose(1, 2)
        strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
        T = torch.eye(C, dtype=q.dtype, device=q.device) + torch.where(strict, ratio, 0) * bh[..., None, :] * (
            kh @ kh.transpose(-1, -2))
        D = ratio * bh[..., None, :] * (qh @ kh.transpose(-1, -2))
        A = torch.linalg.solve_triangular(T, D, upper=False, left=False)  # D T^-1
        q_start = gamma[..., None] * qh - A @ (gamma[..., None] * kh)
        kappa = torch.linalg.solve_triangular(T.transpose(-1, -2), (to_end * bh)[..., None] * kh, upper=True)
    sigma = sigma.to(q.device)
    tok, car = sigma[..., L:], sigma[..., :L]  # [B, H, C, C], [B, H, C, L]
    lam_tok = torch.where(tok >= 0, torch.gather(lh, -1, tok.clamp(min=0)), 0)
    lam_car = torch.gather(lh, -1, car)
    o = (lam_tok * A) @ vh + torch.einsum("bhji,bhjk,bhikv->bhjv", lam_car, q_start, S)
    # States at the chunk end: carried states moved by G then carried by P_end, plus the tokens.
    G = torch.nn.functional.one_hot(car[:, :, -1], L).transpose(-1, -2).to(S)  # [B, H, L(new), L(old)]
    E = torch.where(tok[:, :, -1, None, :] == torch.arange(L, device=q.device)[:, None], 1.0, 0.0).to(S)
    moved = torch.einsum("bhmi,bhikv->bhmkv", G, S)
    if beta is None:
        carried = torch.exp(end)[..., None, None] * moved
    else:
        P_end = torch.exp(end)[..., None] * torch.eye(kh.shape[-1], dtype=q.dtype, device=q.device) - \
            kappa.transpose(-1, -2) @ (gamma[..., None] * kh)
        carried = torch.einsum("bhkl,bhmlv->bhmkv", P_end, moved)
    S = carried + torch.einsum("bhms,bhsk,bhsv->bhmkv", E, kappa, vh)
    return scale * o.transpose(1, 2), S


def _part(x, c0, c1):
    return None if x is None else x[:, c0:c1]


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
