"""The chunk math of `dla_torch.ops.chunk` as one Triton kernel: the forward pass, given the decisions.

One program per (row, head, block of Dv columns) walks the chunks in order. Per chunk it builds, in
registers, the base model's intra-chunk attention ``A`` (for the delta rule ``D T^-1``, the unit lower
triangular ``T`` inverted by forward substitution), the queries carried to the chunk start and the keys
carried to its end, then reads ``o = (Lambda * A) v + sum_i lam[slot(i)] q~ S_i`` and moves the K states to
the chunk end. The states live in a two-buffer workspace [B, H, 2, L, Dk, Dv] (read one, write the other),
so no state is kept per chunk. Notation and shapes as in `dla_torch.ops.chunk`.

Used without gradients (inference, evaluation, prefill); training differentiates the PyTorch chunk math.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def chunk_fwd_kernel(q, k, v, g, beta, lam, sigma, work, o, T, H, scale,
                     L: tl.constexpr, C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, BL: tl.constexpr, DELTA: tl.constexpr):
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    rc, rk, rl = tl.arange(0, C), tl.arange(0, BK), tl.arange(0, BL)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < DK, rv < DV
    m2 = mk[:, None] & mv[None, :]
    state = rk[:, None] * DV + rv[None, :]  # offsets of one state's [BK, BV] tile
    size = L * DK * DV
    causal = rc[:, None] >= rc[None, :]
    for c in range(0, tl.cdiv(T, C)):
        rows = c * C + rc
        mt = rows < T
        last = tl.minimum(C, T - c * C) - 1  # the chunk's last token
        tok_rows = (i_b * T + rows) * H + i_h
        qc = tl.load(q + tok_rows[:, None] * DK + rk[None, :], mask=mt[:, None] & mk[None, :], other=0)
        kc = tl.load(k + tok_rows[:, None] * DK + rk[None, :], mask=mt[:, None] & mk[None, :], other=0)
        vc = tl.load(v + tok_rows[:, None] * DV + rv[None, :], mask=mt[:, None] & mv[None, :], other=0)
        lc = tl.load(lam + tok_rows[:, None] * L + rl[None, :], mask=mt[:, None] & (rl[None, :] < L), other=0)
        cum = tl.cumsum(tl.load(g + tok_rows, mask=mt, other=0), axis=0)  # log gamma
        end = tl.sum(tl.where(rc == last, cum, 0), axis=0)
        gamma = tl.exp(cum)
        ratio = tl.where(causal, tl.exp(cum[:, None] - cum[None, :]), 0)  # gamma_j / gamma_s
        to_end = tl.exp(end - cum)
        qk = tl.dot(qc, tl.trans(kc))
        if DELTA:
            bc = tl.load(beta + tok_rows, mask=mt, other=0)
            Tm = tl.where(rc[:, None] > rc[None, :], ratio * bc[None, :] * tl.dot(kc, tl.trans(kc)), 0)
            Ti = tl.where(rc[:, None] == rc[None, :], 1.0, 0.0)  # (I + Tm)^-1, row by row
            for i in range(1, C):
                t_row = tl.sum(tl.where(rc[:, None] == i, Tm, 0), axis=0)
                Ti = tl.where(rc[:, None] == i, Ti - tl.sum(t_row[:, None] * Ti, axis=0)[None, :], Ti)
            A = tl.dot(ratio * bc[None, :] * qk, Ti)
            q_start = gamma[:, None] * qc - tl.dot(A, gamma[:, None] * kc)
            kappa = tl.dot(tl.trans(Ti), (to_end * bc)[:, None] * kc)
        else:
            A = ratio * qk
            q_start = gamma[:, None] * qc
            kappa = to_end[:, None] * kc
        sig = sigma + (i_bh * T + rows[:, None]) * (L + C)
        tok = tl.load(sig + L + rc[None, :], mask=mt[:, None], other=-1).to(tl.int32)  # [C, C]
        car = tl.load(sig + rl[None, :], mask=mt[:, None] & (rl[None, :] < L), other=0).to(tl.int32)  # [C, BL]
        lam_tok = tl.where(tok >= 0, tl.gather(lc, tl.maximum(tok, 0), axis=1), 0)
        lam_car = tl.gather(lc, car, axis=1)
        out = tl.dot((lam_tok * A).to(vc.dtype), vc)
        src = work + (i_bh * 2 + c % 2) * size
        dst = work + (i_bh * 2 + (c + 1) % 2) * size
        # Reads of the carried states, and the moves to their slots at the chunk end (several may merge).
        car_end = tl.sum(tl.where(rc[:, None] == last, car, 0), axis=0)  # [BL]
        for i in range(0, L):
            tl.store(dst + i * DK * DV + state, tl.zeros([BK, BV], dtype=tl.float32), mask=m2)
        tl.debug_barrier()
        for i in range(0, L):
            S_i = tl.load(src + i * DK * DV + state, mask=m2, other=0)
            w = tl.sum(tl.where(rl[None, :] == i, lam_car, 0), axis=1)  # lam_t[slot_t(i)]  [C]
            out += w[:, None] * tl.dot(q_start, S_i)
            to = tl.sum(tl.where(rl == i, car_end, 0), axis=0)
            moved = tl.load(dst + to * DK * DV + state, mask=m2, other=0)
            tl.store(dst + to * DK * DV + state, moved + S_i, mask=m2)
        tl.debug_barrier()
        tok_end = tl.sum(tl.where(rc[:, None] == last, tok, 0), axis=0)  # slot of each token at the end [C]
        for m in range(0, L):
            X = tl.load(dst + m * DK * DV + state, mask=m2, other=0)
            if DELTA:  # P_end X = gamma_end X - kappa^T (Gamma K X)
                X = tl.exp(end) * X - tl.dot(tl.trans(kappa), tl.dot(gamma[:, None] * kc, X))
            else:
                X = tl.exp(end) * X
            written = tl.where(tok_end == m, 1.0, 0.0)
            X += tl.dot(tl.trans(written[:, None] * kappa), vc)
            tl.store(dst + m * DK * DV + state, X, mask=m2)
        tl.store(o + tok_rows[:, None] * DV + rv[None, :], scale * out, mask=mt[:, None] & mv[None, :])
        tl.debug_barrier()  # the next chunk reads what this one wrote


def chunk_forward(q, k, v, g, lam, beta, S, sigma, scale, chunk_size):
    """Outputs [B, T, H, Dv] and the final states [B, H, L, Dk, Dv] of a block (shapes of `dla_chunk`)."""
    B, T, H, Dk = q.shape
    Dv, L = v.shape[-1], S.shape[2]
    if T == 0:
        return q.new_zeros(B, 0, H, Dv), S
    BK, BV = max(16, triton.next_power_of_2(Dk)), max(16, min(64, triton.next_power_of_2(Dv)))
    work = torch.empty(B, H, 2, L, Dk, Dv, dtype=torch.float32, device=q.device)
    work[:, :, 0] = S
    o = torch.empty(B, T, H, Dv, dtype=torch.float32, device=q.device)
    c = lambda x: x.to(torch.float32).contiguous()
    chunk_fwd_kernel[(B * H, triton.cdiv(Dv, BV))](
        c(q), c(k), c(v), c(g), c(g if beta is None else beta), c(lam), sigma.contiguous(), work, o, T, H,
        float(scale), L=L, C=chunk_size, DK=Dk, DV=Dv, BK=BK, BV=BV, BL=triton.next_power_of_2(L),
        DELTA=beta is not None)
    return o, work[:, :, triton.cdiv(T, chunk_size) % 2].to(S.dtype)
