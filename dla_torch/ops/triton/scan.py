"""The decision scan as one Triton kernel: the mirror of `dla_shared.scan`, line for line.

One program per (row, head) walks the whole sequence, carrying only the newest state X [Dk, Dv] and the
cache's bookkeeping (n, ibar, pos, opened) in registers, and writes ``sigma`` (see
`dla_torch.ops.chunk.host_scan`). Each head compares its score with its own threshold (``thresholds`` [H],
float64 as in `dla_shared.policy`). The policies of `dla_shared.policy` are re-expressed with vectors over
slots: a slot map ``dest`` moves n, ibar and every tracked slot through one-hot comparisons instead of
scatters. `_score` and `_plan` mirror dla_common.h's
``dla_score`` and ``dla_plan``, the Metal kernels' score and decisions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dla_shared import policy
from dla_shared.config import DLAConfig
from dla_shared.state import DLAState

# The kernel ids of `dla_shared.policy`, as the constants a kernel may read (the names of dla_common.h's enums).
POLICY_SINGLE = tl.constexpr(policy.POLICY_IDS["single"])
POLICY_FENWICK = tl.constexpr(policy.POLICY_IDS["fenwick"])
POLICY_FIXED = tl.constexpr(policy.POLICY_IDS["fixed"])
MERGE_DENSITY = tl.constexpr(policy.MERGE_IDS["density"])
SCORE_TOKEN_DRIFT = tl.constexpr(policy.SCORE_IDS["token_drift"])


@triton.jit
def _move(x, dest, slots, BL: tl.constexpr):
    """out[i] = sum of x[j] over the slots j with dest[j] == i (x, dest: [BL])."""
    hit = dest[None, :] == slots[:, None]
    return tl.sum(tl.where(hit, x[None, :], 0), axis=1)


@triton.jit
def _score(state_sq, token_sq, cross, size, eps, SCORE: tl.constexpr):
    """Eq. 13 from ||S~||^2, ||s_t||^2 and <S~, s_t>, size = Dk * Dv: dla_common.h's dla_score
    (`dla_shared.policy.score_from_terms`)."""
    r_state = 1.0 / tl.sqrt(state_sq / size + eps)
    if SCORE == SCORE_TOKEN_DRIFT:
        other_sq = token_sq
        other_cross = cross
    else:
        other_sq = state_sq + token_sq + 2 * cross
        other_cross = state_sq + cross
    r_other = 1.0 / tl.sqrt(other_sq / size + eps)
    dist_sq = r_other * r_other * other_sq + r_state * r_state * state_sq - 2 * r_other * r_state * other_cross
    return tl.sqrt(tl.maximum(dist_sq, 0.0)) / (r_state * tl.sqrt(state_sq) + eps)


@triton.jit
def _plan(n, ibar, pos, score, on, threshold, rl, L: tl.constexpr, BL: tl.constexpr, POLICY: tl.constexpr,
          MERGE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """One token's decisions for one cache, dla_common.h's dla_plan (`dla_shared.policy.plan`) with vectors over
    the slots ``rl``: (dest, n, ibar, opened), dest[j] the new slot of old slot j, n and ibar the bookkeeping
    after the token (unchanged where not ``on``), opened whether it opens a state where ``on``."""
    empty = tl.sum(n, axis=0) == 0
    score = tl.where(empty, 0.0, score)  # the first token opens the first state with I = 0
    dest = rl
    if POLICY == POLICY_SINGLE:
        opened = empty
    elif POLICY == POLICY_FENWICK:  # levels 0..j fold into j + 1, j = trailing ones of pos - 1
        below = (tl.full([BL], 1, tl.int64) << tl.minimum(rl + 1, 62).to(tl.int64)) - 1
        j = tl.sum(((pos.to(tl.int64) & below) == 0).to(tl.int32), axis=0)
        dest = tl.where(empty, rl, tl.where(rl <= j, j + 1, rl))
        opened = pos >= 0
    else:
        if POLICY == POLICY_FIXED:
            opens = (pos % BLOCK_SIZE) == 0
        else:
            opens = score.to(tl.float64) >= threshold
        opened = empty | opens
        # Full: merge the pair (p, p + 1) first, then everything moves one slot older.
        m = tl.sum((n > 0).to(tl.int32), axis=0)
        if MERGE == MERGE_DENSITY:
            nxt_n = tl.sum(tl.where(rl[None, :] == rl[:, None] + 1, n[None, :], 0), axis=1)
            nxt_i = tl.sum(tl.where(rl[None, :] == rl[:, None] + 1, ibar[None, :], 0), axis=1)
            valid = rl < m - 1
            density = tl.where(valid, (ibar + nxt_i) / tl.maximum(n + nxt_n, 1).to(ibar.dtype), float("inf"))
            least = tl.min(density, axis=0)
            p = tl.max(tl.where(valid & (density == least), rl, -1), axis=0)  # ties: the oldest pair
            nan = valid & (density != density)  # a NaN is least, as in numpy's argmin
            p = tl.where(tl.max(nan.to(tl.int32), axis=0) > 0, tl.max(tl.where(nan, rl, -1), axis=0), p)
        else:
            p = m - 2
        merged = tl.where((m == L) & (rl > p), rl - 1, rl)
        dest = tl.where(opens & ~empty, tl.minimum(merged + 1, L - 1), rl)
    dest = tl.where(on, dest, rl)
    n = _move(n, dest, rl, BL)
    ibar = _move(ibar, dest, rl, BL)
    n = tl.where(on & (rl == 0), n + 1, n)
    ibar = tl.where(on & (rl == 0), ibar + score, ibar)
    return dest, n, ibar, opened


@triton.jit
def scan_kernel(k, v, g, beta, active, thresholds, X0, n0, ibar0, pos0, opened0, sigma, n_out, ibar_out, pos_out,
                opened_out, T, H, eps,
                L: tl.constexpr, C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr, BS: tl.constexpr,
                POLICY: tl.constexpr, SCORE: tl.constexpr, MERGE: tl.constexpr,
                BLOCK_SIZE: tl.constexpr, DELTA: tl.constexpr, SCORED: tl.constexpr):
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // H, i_bh % H
    rk, rv, rl, rs = tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BL), tl.arange(0, BS)
    mk, mv, ml = rk < DK, rv < DV, rl < L
    m2 = mk[:, None] & mv[None, :]
    X = tl.load(X0 + i_bh * DK * DV + rk[:, None] * DV + rv[None, :], mask=m2, other=0)
    n = tl.load(n0 + i_bh * L + rl, mask=ml, other=0)
    ibar = tl.load(ibar0 + i_bh * L + rl, mask=ml, other=0)
    pos = tl.load(pos0 + i_b)
    count = tl.load(opened0 + i_bh)
    threshold = tl.load(thresholds + i_h)
    slot_of = tl.where(rs < L, rs, -1)
    for t in range(0, T):
        j_chunk = t % C
        slot_of = tl.where(j_chunk == 0, tl.where(rs < L, rs, -1), slot_of)
        row = (i_b * T + t) * H + i_h
        on = tl.load(active + i_b * T + t) != 0
        if SCORED:
            kt = tl.load(k + row * DK + rk, mask=mk, other=0)
            vt = tl.load(v + row * DV + rv, mask=mv, other=0)
            decay = tl.exp(tl.load(g + row))
            token = kt[:, None] * vt[None, :]
            if DELTA:
                bt = tl.load(beta + row)
                kX = tl.sum(kt[:, None] * X, axis=0)
                S_new = decay * (X - bt * kt[:, None] * kX[None, :])
                token = bt * token
            else:
                S_new = decay * X
            state_sq = tl.sum(tl.sum(S_new * S_new, axis=1), axis=0)
            token_sq = tl.sum(tl.sum(token * token, axis=1), axis=0)
            cross = tl.sum(tl.sum(S_new * token, axis=1), axis=0)
            score = _score(state_sq, token_sq, cross, DK * DV, eps, SCORE)
        else:  # no decision reads a score: nothing is carried
            score = tl.sum(tl.where(rl < 0, ibar, 0), axis=0)  # a zero of ibar's dtype
        dest, n, ibar, opened = _plan(n, ibar, pos, score, on, threshold, rl, L, BL, POLICY, MERGE, BLOCK_SIZE)
        moved = tl.sum(tl.where(slot_of[:, None] == rl[None, :], dest[None, :], 0), axis=1)
        slot_of = tl.where(slot_of >= 0, moved, -1)
        slot_of = tl.where(on & (rs == L + j_chunk), 0, slot_of)
        if SCORED:
            X = tl.where(on, tl.where(opened, token, S_new + token), X)
        count = tl.where(on & opened & (pos > 0), count + 1, count)  # boundaries: opens after the first token
        pos = tl.where(on, pos + 1, pos)
        tl.store(sigma + (i_bh * T + t) * (L + C) + rs, slot_of.to(tl.int16), mask=rs < L + C)
    tl.store(n_out + i_bh * L + rl, n, mask=ml)
    tl.store(ibar_out + i_bh * L + rl, ibar, mask=ml)
    tl.store(pos_out + i_b, pos, mask=i_h == 0)
    tl.store(opened_out + i_bh, count)


def triton_scan(config: DLAConfig, k, v, g, beta, active, state: DLAState, chunk_size):
    """Same contract as `dla_torch.ops.chunk.host_scan`, on the kernel."""
    B, T, H, Dk = k.shape
    Dv, L = v.shape[-1], state.n.shape[-1]
    device = k.device
    policy.check_levels(config, int((state.pos.to(device) + active.sum(1)).max()) if B else 0)
    dtype = state.S.dtype
    sigma = torch.empty(B, H, T, L + chunk_size, dtype=torch.int16, device=device)
    n = torch.empty(B, H, L, dtype=torch.int32, device=device)
    ibar = torch.empty(B, H, L, dtype=dtype, device=device)
    pos = torch.empty(B, dtype=torch.int32, device=device)
    opened = torch.empty(B, H, dtype=torch.int32, device=device)
    thresholds = torch.from_numpy(config.thresholds(H)).to(device)
    c = lambda x: x.contiguous()
    i32 = lambda x: x.to(device, torch.int32).contiguous()
    scan_kernel[(B * H,)](
        c(k), c(v), c(g), c(g if beta is None else beta), c(active.to(torch.int8)), thresholds, c(state.S[:, :, 0]),
        i32(state.n), c(state.ibar.to(device, dtype)), i32(state.pos), i32(state.opened),
        sigma, n, ibar, pos, opened, T, H, float(config.eps),
        L=L, C=chunk_size, DK=Dk, DV=Dv, BK=triton.next_power_of_2(Dk), BV=triton.next_power_of_2(Dv),
        BL=triton.next_power_of_2(L), BS=triton.next_power_of_2(L + chunk_size),
        POLICY=policy.POLICY_IDS[config.policy], SCORE=policy.SCORE_IDS[config.score],
        MERGE=policy.MERGE_IDS[config.merge], BLOCK_SIZE=config.block_size, DELTA=beta is not None,
        SCORED=config.scored,
    )
    return sigma, (n.cpu().long(), ibar.cpu(), pos.cpu().long(), opened.cpu().long())
