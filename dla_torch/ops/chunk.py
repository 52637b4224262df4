"""Chunkwise DLA in pure PyTorch (DESIGN section 3): a scalar scan decides, matmuls compute.

For each chunk of C tokens (the last may be shorter), with the K carried states S_i at its start:

1. **Scan** (no gradient, `host_scan`: `dla_shared.scan` on the host): one pass over the tokens carries
   only the newest state, which is all the score needs, and records the decisions as ``sigma[t, x]``: the
   slot, after token t, of the state carried into t's chunk x (x < L) or of the chunk's token x - L (-1 if
   not written yet).
2. **Math** (differentiable). Per chunk, with ``gamma_j = exp(cumsum g)`` and for the delta rule the
   triangular ``T[j, s] = delta_js + [s < j] (gamma_j / gamma_s) beta_s k_j.k_s`` (the UT transform):
   ``A = D T^-1`` is the base model's attention matrix inside the chunk (D its decay-masked q.k beta),
   ``q~ = Gamma q - A Gamma k`` are the queries carried back to the chunk start (P(c0..t)^T q_t), and
   ``kappa = T^-T W`` (W_s = (gamma_end / gamma_s) beta_s k_s) the keys carried to the chunk end. Then
   ``o_t = scale (sum_s lam_t[slot_t(s)] A[t, s] v_s + sum_i lam_t[slot_t(i)] q~_t^T S_i)`` and the states
   at the chunk end are ``P_end (G S) + E (kappa v^T)``, G and E the 0/1 maps of carried states and tokens
   to end slots (G S as one index_add, `_move`), ``P_end = gamma_end I - kappa^T Gamma K``. The diagonal
   transition is T = I.

Backward is autograd through the math, recomputed per segment of chunks (`torch.utils.checkpoint`), so
that only one set of K states per segment is kept, not one per chunk. Shapes as in `dla_torch.dla_attention`.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from dla_shared.scan import scan
from dla_shared.state import DLAState, decay_floor

CHUNK = 64


def dla_chunk(q, k, v, g, lam, beta, mask, state: DLAState, *, config, scale, chunk_size=CHUNK, decide=None,
              fused_forward=None, fused_segments=None):
    """Run a [B, T] block from ``state``; return (o [B, T, H, Dv], final DLAState).

    ``decide`` computes the decisions (`host_scan` by default; the Triton impl passes `triton_scan`).
    ``fused_forward(q, k, v, g, lam, beta, S, sigma, scale, chunk_size) -> (o, S)`` replaces the PyTorch
    chunk math when no gradient is needed, and ``fused_segments(q, k, v, g, lam, beta, S, sigma, scale,
    chunk_size)`` replaces each recomputed segment when one is (the Triton impl passes its fused kernels).
    """
    B, T, H, _ = q.shape
    # Padding arrives zeroed (`dla_attention`): an identity transition, no write, zero output.
    active = torch.ones(B, T, dtype=torch.bool, device=q.device) if mask is None else mask.to(q.device)
    with torch.no_grad():
        sigma, book = (decide or host_scan)(config, k, v, g, beta, active, state, chunk_size)
    g = g.clamp(min=decay_floor(torch.finfo(g.dtype).eps))  # the scan decided on g itself
    k, v, g, beta, poisoned = _contain(k, v, g, beta)
    bounds = list(range(0, T, chunk_size)) + [T]
    chunks = list(zip(bounds[:-1], bounds[1:]))
    if not needs_grad(q, k, v, g, lam, beta, state.S):
        if fused_forward is not None:
            o, S = fused_forward(q, k, v, g, lam, beta, state.S, sigma, scale, chunk_size)
        else:
            o, S = _run_chunks(q, k, v, g, lam, beta, state.S, chunks, sigma, scale)
    else:
        # Keep the K states only at the start of each segment of sqrt(#chunks) chunks; recompute the rest.
        outputs, S = [], state.S
        per = max(1, math.isqrt(len(chunks)))
        for first in range(0, len(chunks), per):
            seg = chunks[first : first + per]
            s0, s1 = seg[0][0], seg[-1][1]
            if fused_segments is not None:
                o, S = fused_segments(q[:, s0:s1], k[:, s0:s1], v[:, s0:s1], g[:, s0:s1], lam[:, s0:s1],
                                      _part(beta, s0, s1), S, sigma[:, :, s0:s1], scale, chunk_size)
            else:
                o, S = checkpoint(_run_chunks, q[:, s0:s1], k[:, s0:s1], v[:, s0:s1], g[:, s0:s1], lam[:, s0:s1],
                                  _part(beta, s0, s1), S, [(a - s0, b - s0) for a, b in seg], sigma[:, :, s0:s1],
                                  scale, use_reentrant=False)
            outputs.append(o)
        o = torch.cat(outputs, dim=1) if outputs else q.new_zeros(B, 0, H, v.shape[-1])
    o = torch.where(poisoned[..., None], math.nan, o)
    S = torch.where(poisoned[:, -1:].transpose(1, 2)[..., None, None], math.nan, S) if T else S
    return o, DLAState(S, *book)


def _contain(k, v, g, beta):
    """Zero the tokens whose k, v, g or beta is not finite; return them and ``poisoned`` bool [B, T, H],
    true from a head's first such token on, where the outputs (and then the end states) are set to NaN.

    The chunk math multiplies zeros of its causal masks by later tokens (A @ v, the triangular solve), so
    a NaN left in would reach earlier tokens; zeroed, it cannot, and the NaN is put back where it belongs.
    """
    bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1) & torch.isfinite(g))
    if beta is not None:
        bad |= ~torch.isfinite(beta)
    zero = lambda x: None if x is None else torch.where(bad.view(*bad.shape, *[1] * (x.dim() - 3)), 0, x)
    return *map(zero, (k, v, g, beta)), torch.cumsum(bad, dim=1) > 0


def _run_chunks(q, k, v, g, lam, beta, S, chunks, sigma, scale):
    B, _, H, _ = q.shape
    L = S.shape[2]
    outputs = [q.new_zeros(B, 0, H, S.shape[-1])]
    reach = _reach(sigma, chunks, L)
    for (c0, c1), U in zip(chunks, reach):
        o, S = _one_chunk(q[:, c0:c1], k[:, c0:c1], v[:, c0:c1], g[:, c0:c1], lam[:, c0:c1], _part(beta, c0, c1),
                          S, sigma[:, :, c0:c1, : L + c1 - c0].long(), scale, U)
        outputs.append(o)
    return torch.cat(outputs, dim=1), S


def _reach(sigma, chunks, L) -> list[int]:
    """Per chunk, 1 + the largest slot that holds one of its tokens at its end (one host read for all chunks):
    the write touches only the slots below it, the newest ones (for fenwick, the levels up to it)."""
    if not chunks:
        return []
    return (sigma[:, :, [c1 - 1 for _, c1 in chunks], L:].amax(dim=(0, 1, 3)).long() + 1).tolist()


def host_scan(config, k, v, g, beta, active, state: DLAState, chunk_size):
    """The decisions (`dla_shared.scan`, on the host): ``sigma`` int16 [B, H, T, L + C] on k's device and
    the final bookkeeping (n, ibar, pos, opened) as CPU tensors."""
    host = lambda x: None if x is None else x.detach().cpu().numpy()
    data = (k, v, g, beta) if config.scored else (None,) * 4  # unscored decisions read positions only
    sigma, book = scan(config, *map(host, data), host(active), host(state.S[:, :, 0]), host(state.n),
                       host(state.ibar), host(state.pos), host(state.opened), chunk_size)
    return torch.from_numpy(sigma).to(k.device), tuple(torch.from_numpy(x) for x in book)


def _one_chunk(q, k, v, g, lam, beta, S, sigma, scale, reach):
    """Outputs and end states of one chunk given its decisions (see the module docstring); its tokens are
    written into the slots below ``reach`` (`_reach`)."""
    L = S.shape[2]
    qh, kh, vh, lh = (x.transpose(1, 2) for x in (q, k, v, lam))  # [B, H, C, D]
    C = qh.shape[2]
    cum = torch.cumsum(g.transpose(1, 2), dim=-1)  # log gamma  [B, H, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    ratio = torch.exp(torch.where(causal, cum[..., :, None] - cum[..., None, :], -math.inf))  # gamma_j / gamma_s
    gamma, end = torch.exp(cum), cum[..., -1:]
    to_end = torch.exp(end - cum)  # gamma_end / gamma_s
    if beta is None:
        A = torch.where(causal, ratio * (qh @ kh.transpose(-1, -2)), 0)
        q_start = gamma[..., None] * qh
        kappa = to_end[..., None] * kh
    else:
        bh = beta.transpose(1, 2)
        strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
        T = torch.eye(C, dtype=q.dtype, device=q.device) + torch.where(
            strict, ratio * bh[..., None, :] * (kh @ kh.transpose(-1, -2)), 0)
        D = torch.where(causal, ratio * bh[..., None, :] * (qh @ kh.transpose(-1, -2)), 0)
        A = torch.linalg.solve_triangular(T, D, upper=False, left=False)  # D T^-1
        q_start = gamma[..., None] * qh - A @ (gamma[..., None] * kh)
        kappa = torch.linalg.solve_triangular(T.transpose(-1, -2), (to_end * bh)[..., None] * kh, upper=True)
    sigma = sigma.to(q.device)
    tok, car = sigma[..., L:], sigma[..., :L]  # [B, H, C, C], [B, H, C, L]
    lam_tok = torch.where(tok >= 0, torch.gather(lh, -1, tok.clamp(min=0)), 0)
    lam_car = torch.gather(lh, -1, car)
    o = (lam_tok * A) @ vh + torch.einsum("bhji,bhjk,bhikv->bhjv", lam_car, q_start, S)
    # States at the chunk end: carried states moved (G S) then carried by P_end, plus the tokens.
    E = torch.where(tok[:, :, -1, None, :] == torch.arange(reach, device=q.device)[:, None], 1.0, 0.0).to(S)
    moved = _move(S, car[:, :, -1])
    if beta is None:
        carried = torch.exp(end)[..., None, None] * moved
    else:
        P_end = torch.exp(end)[..., None] * torch.eye(kh.shape[-1], dtype=q.dtype, device=q.device) - \
            kappa.transpose(-1, -2) @ (gamma[..., None] * kh)
        carried = torch.einsum("bhkl,bhmlv->bhmkv", P_end, moved)
    carried[:, :, :reach] += torch.einsum("bhms,bhsk,bhsv->bhmkv", E, kappa, vh)
    return scale * o.transpose(1, 2), carried


def _move(S, dest):
    """G S: new slot m holds the sum of the carried states i with ``dest[i] == m``. S [B, H, L, Dk, Dv], dest
    int [B, H, L]. One index_add over the (row, head, slot) matrices: L times fewer operations than the
    product with the 0/1 matrix G."""
    B, H, L = dest.shape
    rows = (dest + L * torch.arange(B * H, device=dest.device).view(B, H, 1)).reshape(-1)
    flat = S.reshape(B * H * L, -1)
    return torch.zeros_like(flat).index_add_(0, rows, flat).view(S.shape)


def _part(x, c0, c1):
    return None if x is None else x[:, c0:c1]


def needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
