"""The chunk math of `dla_torch.ops.chunk` as one Triton kernel: the forward pass, given the decisions.

One program per (row, head, block of Dv columns) walks the chunks in order. Per chunk it builds, in
registers, the base model's intra-chunk attention ``A`` (for the delta rule ``D T^-1``, the unit lower
triangular ``T`` inverted by forward substitution), the queries carried to the chunk start and the keys
carried to its end, then reads ``o = (Lambda * A) v + sum_i lam[slot(i)] q~ S_i`` and moves the K states to
the chunk end. The states live in a two-buffer workspace [B, H, 2, L, Dk, Dv] (read one, write the other),
so no state is kept per chunk. Notation and shapes as in `dla_torch.ops.chunk`.

`chunk_forward` runs it without gradients (inference, evaluation, prefill); `FusedChunks` pairs it with the
fused backward kernel for training (`dla_torch.ops.triton.dla_triton`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _unit_lower_inverse(Tm, rc, C: tl.constexpr):
    """(I + Tm)^-1 for a strictly lower triangular Tm [C, C], row by row (forward substitution)."""
    Ti = tl.where(rc[:, None] == rc[None, :], 1.0, 0.0)
    for i in range(1, C):
        t_row = tl.sum(tl.where(rc[:, None] == i, Tm, 0), axis=0)
        Ti = tl.where(rc[:, None] == i, Ti - tl.sum(t_row[:, None] * Ti, axis=0)[None, :], Ti)
    return Ti


@triton.jit
def _load_chunk(q, k, v, g, lam, sigma, i_bh, i_b, i_h, c, T, H, rc, rk, rv, rl,
                L: tl.constexpr, C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr):
    """What both kernels read and derive of chunk c of one (row, head): the token rows, their mask and the
    chunk's last token; q, k [C, BK] and v [C, BV]; log gamma_end, gamma, gamma_j / gamma_s (causal) and
    gamma_end / gamma_s (0 past the sequence end); q.k; from sigma the slot of each token (tok [C, C], -1 before
    it is written) and of each carried state (car [C, BL]), and the read weights of both."""
    rows = c * C + rc
    mt = rows < T
    last = tl.minimum(C, T - c * C) - 1  # the chunk's last token
    tok_rows = (i_b * T + rows) * H + i_h
    mtk = mt[:, None] & (rk < DK)[None, :]
    qc = tl.load(q + tok_rows[:, None] * DK + rk[None, :], mask=mtk, other=0)
    kc = tl.load(k + tok_rows[:, None] * DK + rk[None, :], mask=mtk, other=0)
    vc = tl.load(v + tok_rows[:, None] * DV + rv[None, :], mask=mt[:, None] & (rv < DV)[None, :], other=0)
    lc = tl.load(lam + tok_rows[:, None] * L + rl[None, :], mask=mt[:, None] & (rl[None, :] < L), other=0)
    cum = tl.cumsum(tl.load(g + tok_rows, mask=mt, other=0), axis=0)  # log gamma
    end = tl.sum(tl.where(rc == last, cum, 0), axis=0)
    gamma = tl.exp(cum)
    ratio = tl.where(rc[:, None] >= rc[None, :], tl.exp(cum[:, None] - cum[None, :]), 0)
    to_end = tl.where(mt, tl.exp(end - cum), 0)
    qk = tl.dot(qc, tl.trans(kc))
    sig = sigma + (i_bh * T + rows[:, None]) * (L + C)
    tok = tl.load(sig + L + rc[None, :], mask=mt[:, None], other=-1).to(tl.int32)  # [C, C]
    car = tl.load(sig + rl[None, :], mask=mt[:, None] & (rl[None, :] < L), other=0).to(tl.int32)  # [C, BL]
    lam_tok = tl.where(tok >= 0, tl.gather(lc, tl.maximum(tok, 0), axis=1), 0)
    lam_car = tl.gather(lc, car, axis=1)
    return tok_rows, mt, last, qc, kc, vc, end, gamma, ratio, to_end, qk, tok, car, lam_tok, lam_car


@triton.jit
def _delta_terms(qc, kc, bc, ratio, gamma, to_end, qk, rc, C: tl.constexpr):
    """The delta rule's chunk terms: kk = K K^T; Tm, the strictly lower part of (ratio * beta_s) kk, and
    Ti = (I + Tm)^-1; D = (ratio * beta_s) q.k and A = D Ti, the intra-chunk attention; G = Gamma K; the queries
    carried to the chunk start q~ = Gamma q - A G; W = (gamma_end / gamma_s) beta_s k_s and the keys carried to
    its end kappa = Ti^T W. All [C, C] or [C, BK]."""
    kk = tl.dot(kc, tl.trans(kc))
    Tm = tl.where(rc[:, None] > rc[None, :], ratio * bc[None, :] * kk, 0)
    Ti = _unit_lower_inverse(Tm, rc, C)
    D = ratio * bc[None, :] * qk
    A = tl.dot(D, Ti)
    G = gamma[:, None] * kc
    q_start = gamma[:, None] * qc - tl.dot(A, G)
    W = (to_end * bc)[:, None] * kc
    kappa = tl.dot(tl.trans(Ti), W)
    return kk, Tm, Ti, D, A, G, q_start, W, kappa


@triton.jit
def _delta_bwd(qc, kc, bc, ratio, gamma, to_end, qk, kk, Tm, Ti, D, A, G, W, kappa, dA, dq_start, dkappa, dP,
               dq_c, dcum, rc):
    """The delta rule's gradients through `_delta_terms` and P_end = gamma_end I - kappa^T G, given those of A,
    q~, kappa and P_end: dq, dk, dbeta [C] and d log gamma (``dcum``), and the part of the latter that
    kappa's gamma_end / gamma_s adds to gamma_end (``t_end``)."""
    dkappa -= tl.dot(G, tl.trans(dP))
    dG = -tl.dot(kappa, dP) - tl.dot(tl.trans(A), dq_start)
    dA -= tl.dot(dq_start, tl.trans(G))
    dk_c = gamma[:, None] * dG
    dcum += gamma * tl.sum(kc * dG, axis=1)
    dD = tl.dot(dA, tl.trans(Ti))
    dTi = tl.dot(tl.trans(D), dA) + tl.dot(W, tl.trans(dkappa))
    dW = tl.dot(Ti, dkappa)
    dTm = tl.where(rc[:, None] > rc[None, :], -tl.dot(tl.dot(tl.trans(Ti), dTi), tl.trans(Ti)), 0)
    U = dTm * ratio * bc[None, :]
    dk_c += tl.dot(U, kc) + tl.dot(tl.trans(U), kc)
    V2 = dD * ratio * bc[None, :]
    dq_c += tl.dot(V2, kc)
    dk_c += tl.dot(tl.trans(V2), qc)
    dbeta_c = tl.sum(dTm * ratio * kk, axis=0) + tl.sum(dD * ratio * qk, axis=0)
    X = dTm * Tm + dD * D
    dcum += tl.sum(X, axis=1) - tl.sum(X, axis=0)
    kdW = tl.sum(kc * dW, axis=1)
    dk_c += (to_end * bc)[:, None] * dW
    dbeta_c += to_end * kdW
    return dq_c, dk_c, dbeta_c, dcum, to_end * bc * kdW


@triton.jit
def _diagonal_bwd(qc, kc, ratio, to_end, A, dA, dkappa, dq_c, dcum):
    """The diagonal transition's counterpart of `_delta_bwd` (A = ratio * q.k, kappa = (gamma_end / gamma_s) k)."""
    dR = dA * ratio
    dq_c += tl.dot(dR, kc)
    dk_c = tl.dot(tl.trans(dR), qc)
    X = dA * A
    dcum += tl.sum(X, axis=1) - tl.sum(X, axis=0)
    dk_c += to_end[:, None] * dkappa
    return dq_c, dk_c, dcum, to_end * tl.sum(kc * dkappa, axis=1)


@triton.jit
def chunk_fwd_kernel(q, k, v, g, beta, lam, sigma, work, o, starts, T, H, scale,
                     L: tl.constexpr, C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, BL: tl.constexpr, DELTA: tl.constexpr, STORE: tl.constexpr):
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    rc, rk, rl = tl.arange(0, C), tl.arange(0, BK), tl.arange(0, BL)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < DK, rv < DV
    m2 = mk[:, None] & mv[None, :]
    state = rk[:, None] * DV + rv[None, :]  # offsets of one state's [BK, BV] tile
    size = L * DK * DV
    for c in range(0, tl.cdiv(T, C)):
        tok_rows, mt, last, qc, kc, vc, end, gamma, ratio, to_end, qk, tok, car, lam_tok, lam_car = _load_chunk(
            q, k, v, g, lam, sigma, i_bh, i_b, i_h, c, T, H, rc, rk, rv, rl, L, C, DK, DV)
        if DELTA:
            bc = tl.load(beta + tok_rows, mask=mt, other=0)
            _, _, _, _, A, _, q_start, _, kappa = _delta_terms(qc, kc, bc, ratio, gamma, to_end, qk, rc, C)
        else:
            A = ratio * qk
            q_start = gamma[:, None] * qc
            kappa = to_end[:, None] * kc
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
            if STORE:  # the states at each chunk start, for the backward pass
                tl.store(starts + ((i_bh * tl.cdiv(T, C) + c) * L + i) * DK * DV + state, S_i, mask=m2)
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


def chunk_forward(q, k, v, g, lam, beta, S, sigma, scale, chunk_size, starts=None):
    """Outputs [B, T, H, Dv] and the final states [B, H, L, Dk, Dv] of a block (shapes of `dla_chunk`);
    with ``starts`` [B, H, #chunks, L, Dk, Dv] float32, also the states at every chunk start."""
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
        c(q), c(k), c(v), c(g), c(g if beta is None else beta), c(lam), sigma.contiguous(), work, o,
        o if starts is None else starts, T, H, float(scale), L=L, C=chunk_size, DK=Dk, DV=Dv, BK=BK, BV=BV,
        BL=triton.next_power_of_2(L), DELTA=beta is not None, STORE=starts is not None)
    return o, work[:, :, triton.cdiv(T, chunk_size) % 2].to(S.dtype)


@triton.jit
def chunk_bwd_kernel(q, k, v, g, beta, lam, sigma, starts, do, dwork, dq, dk, dv, dg, dbeta, dlam, T, H, scale,
                     L: tl.constexpr, C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, BL: tl.constexpr, DELTA: tl.constexpr):
    """The backward of the chunk math, chunks in reverse; one program per (row, head). ``dwork``
    [B, H, 2, L, Dk, Dv] holds the gradient of the states at the current chunk's end (buffer #chunks % 2 on
    entry: the gradient of the final states) and receives the one at its start. Notation of the forward:
    q~ the queries carried to the chunk start, kappa the keys carried to its end, G = Gamma K."""
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // H, i_bh % H
    rc, rk, rv, rl = tl.arange(0, C), tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BL)
    mk, mv = rk < DK, rv < DV
    m2 = mk[:, None] & mv[None, :]
    state = rk[:, None] * DV + rv[None, :]
    size = L * DK * DV
    NC = tl.cdiv(T, C)
    for back in range(0, NC):
        c = NC - 1 - back
        tok_rows, mt, last, qc, kc, vc, end, gamma, ratio, to_end, qk, tok, car, lam_tok, lam_car = _load_chunk(
            q, k, v, g, lam, sigma, i_bh, i_b, i_h, c, T, H, rc, rk, rv, rl, L, C, DK, DV)
        mtk, mtv = mt[:, None] & mk[None, :], mt[:, None] & mv[None, :]
        doc = scale * tl.load(do + tok_rows[:, None] * DV + rv[None, :], mask=mtv, other=0)
        if DELTA:  # recompute the forward's A, q~, kappa and P_end
            bc = tl.load(beta + tok_rows, mask=mt, other=0)
            kk, Tm, Ti, D, A, G, q_start, W, kappa = _delta_terms(qc, kc, bc, ratio, gamma, to_end, qk, rc, C)
            eye = tl.where(rk[:, None] == rk[None, :], 1.0, 0.0)
            P_end = tl.exp(end) * eye - tl.dot(tl.trans(kappa), G)
        else:
            A = ratio * qk
            q_start = gamma[:, None] * qc
            kappa = to_end[:, None] * kc
        # Inside the chunk: o += (Lambda * A) v.
        dov = tl.dot(doc, tl.trans(vc))  # dO_t . v_s
        dA = lam_tok * dov
        dv_c = tl.dot(tl.trans(lam_tok * A), doc)
        Y = A * dov  # d o / d Lambda[t, s]
        dl = tl.zeros([C, BL], dtype=tl.float32)
        for l in range(0, L):
            dl += tl.where(rl[None, :] == l, tl.sum(tl.where(tok == l, Y, 0), axis=1)[:, None], 0)
        src = dwork + (i_bh * 2 + (c + 1) % 2) * size  # d states at the chunk end
        dst = dwork + (i_bh * 2 + c % 2) * size  # d states at the chunk start
        car_end = tl.sum(tl.where(rc[:, None] == last, car, 0), axis=0)
        tok_end = tl.sum(tl.where(rc[:, None] == last, tok, 0), axis=0)
        dkappa = tl.zeros([C, BK], dtype=tl.float32)
        # The tokens written: S_end[m] += sum_s [slot(s) = m] kappa_s v_s^T.
        for m in range(0, L):
            dS_m = tl.load(src + m * DK * DV + state, mask=m2, other=0)
            e = tl.where(tok_end == m, 1.0, 0.0)
            dkappa += e[:, None] * tl.dot(vc, tl.trans(dS_m))  # row s: dS_m v_s
            dv_c += e[:, None] * tl.dot(kappa, dS_m)
        # The carried states: o += Lambda_car q~^T S_i, and S_end[dest(i)] += P_end S_i.
        dq_start = tl.zeros([C, BK], dtype=tl.float32)
        dP = tl.zeros([BK, BK], dtype=tl.float32)  # d P_end (its trace is all the diagonal case needs)
        for i in range(0, L):
            S_i = tl.load(starts + ((i_bh * NC + c) * L + i) * DK * DV + state, mask=m2, other=0)
            to = tl.sum(tl.where(rl == i, car_end, 0), axis=0)
            dS_to = tl.load(src + to * DK * DV + state, mask=m2, other=0)
            w = tl.sum(tl.where(rl[None, :] == i, lam_car, 0), axis=1)
            SdO = tl.dot(doc, tl.trans(S_i))  # row t: S_i dO_t  [C, BK]
            dq_start += w[:, None] * SdO
            slot = tl.sum(tl.where(rl[None, :] == i, car, 0), axis=1)
            dl += tl.where(rl[None, :] == slot[:, None], tl.sum(q_start * SdO, axis=1)[:, None], 0)
            dP += tl.dot(dS_to, tl.trans(S_i))
            if DELTA:
                dS_i = tl.dot(tl.trans(P_end), dS_to)
            else:
                dS_i = tl.exp(end) * dS_to
            dS_i += tl.dot(tl.trans(w[:, None] * q_start), doc)
            tl.store(dst + i * DK * DV + state, dS_i, mask=m2)
        # d gamma_end: tr(dP) (gamma_end I in P_end, or in the diagonal case the whole carried term)
        dend = tl.exp(end) * tl.sum(tl.sum(tl.where(rk[:, None] == rk[None, :], dP, 0), axis=1), axis=0)
        dq_c = gamma[:, None] * dq_start
        dcum = gamma * tl.sum(qc * dq_start, axis=1)
        if DELTA:
            dq_c, dk_c, dbeta_c, dcum, t_end = _delta_bwd(qc, kc, bc, ratio, gamma, to_end, qk, kk, Tm, Ti, D, A,
                                                          G, W, kappa, dA, dq_start, dkappa, dP, dq_c, dcum, rc)
        else:
            dq_c, dk_c, dcum, t_end = _diagonal_bwd(qc, kc, ratio, to_end, A, dA, dkappa, dq_c, dcum)
        dend += tl.sum(t_end, axis=0)
        dcum -= t_end
        dcum += tl.where(rc == last, dend, 0)
        dg_c = tl.sum(tl.where(rc[None, :] >= rc[:, None], dcum[None, :], 0), axis=1)  # reverse cumsum
        tl.store(dq + tok_rows[:, None] * DK + rk[None, :], dq_c, mask=mtk)
        tl.store(dk + tok_rows[:, None] * DK + rk[None, :], dk_c, mask=mtk)
        tl.store(dv + tok_rows[:, None] * DV + rv[None, :], dv_c, mask=mtv)
        tl.store(dg + tok_rows, dg_c, mask=mt)
        if DELTA:
            tl.store(dbeta + tok_rows, dbeta_c, mask=mt)
        tl.store(dlam + tok_rows[:, None] * L + rl[None, :], dl, mask=mt[:, None] & (rl[None, :] < L))
        tl.debug_barrier()  # the next (earlier) chunk reads the gradients this one wrote


class FusedChunks(torch.autograd.Function):
    """The chunk math, forward and backward in Triton: (o, final states). ``beta`` None: the diagonal
    transition."""

    @staticmethod
    def forward(ctx, q, k, v, g, lam, beta, S, sigma, scale, chunk_size):
        o, S_end = chunk_forward(q, k, v, g, lam, beta, S, sigma, scale, chunk_size)
        ctx.save_for_backward(q, k, v, g, lam, beta, S, sigma)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        return o, S_end

    @staticmethod
    def backward(ctx, do, dS_end):
        q, k, v, g, lam, beta, S, sigma = ctx.saved_tensors
        B, T, H, Dk = q.shape
        Dv, L, C = v.shape[-1], S.shape[2], ctx.chunk_size
        n = triton.cdiv(T, C)
        starts = torch.empty(B, H, n, L, Dk, Dv, dtype=torch.float32, device=q.device)
        chunk_forward(q, k, v, g, lam, beta, S, sigma, ctx.scale, C, starts=starts)  # recompute the states
        dwork = torch.empty(B, H, 2, L, Dk, Dv, dtype=torch.float32, device=q.device)
        dwork[:, :, n % 2] = 0 if dS_end is None else dS_end
        inputs = (q, k, v, g, g if beta is None else beta, lam)
        grads = [torch.empty(x.shape, dtype=torch.float32, device=q.device) for x in inputs]
        f32 = lambda x: x.to(torch.float32).contiguous()
        chunk_bwd_kernel[(B * H,)](
            *map(f32, inputs[:5]), f32(lam), sigma.contiguous(), starts,
            f32(torch.zeros_like(v) if do is None else do), dwork, *grads, T, H, float(ctx.scale), L=L, C=C,
            DK=Dk, DV=Dv, BK=max(16, triton.next_power_of_2(Dk)), BV=max(16, triton.next_power_of_2(Dv)),
            BL=triton.next_power_of_2(L), DELTA=beta is not None)
        dq, dk, dv, dg, dbeta, dlam = (gr.to(x.dtype) for gr, x in zip(grads, inputs))
        return dq, dk, dv, dg, dlam, None if beta is None else dbeta, dwork[:, :, 0].to(S.dtype), None, None, None
