"""The numpy float64 oracle: DESIGN section 2 token by token, one (row, head) at a time, literally.

Every backend's reference and fast path is tested against this. It favours being obviously right over
speed: the scores materialize R(.) instead of using the three-scalar form the backends use.

Shapes (public layout ``[B, T, H, D]``; log-space decay):

==================  ==============  ==========================================================
q, k                [B, T, H, Dk]
v                   [B, T, H, Dv]
g                   [B, T, H]       log decay, g <= 0; the transition multiplies by exp(g)
lam                 [B, T, H, L]    read weights per slot, L = config.num_slots; None = all ones
beta                [B, T, H]       None: diagonal transition; else the gated delta rule
mask                [B, T] bool     False = padding: changes nothing, its output is zero
cu_seqlens          [N + 1] int     packed sequences in one row (B == 1), FlashAttention-style
initial_state       DLAState        batch N (= B without cu_seqlens)
returns o           [B, T, H, Dv]   float64, and the final DLAState (numpy) or None
==================  ==============  ==========================================================
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import policy
from .config import DLAConfig
from .state import DLAState, canonical, check_inputs


@dataclasses.dataclass
class Trace:
    """What the cache did at every token (``inspect``); padding has score NaN and pos -1.

    ======================  ==================================================================
    score [B, T, H]         the information score I_t (0 for a sequence's first token), under every
                            policy; it enters ibar only where a decision reads it (`DLAConfig.scored`)
    opened bool [B, T, H]   the token opened a new state
    merge_slot [B, T, H]    the slot, after the token, that holds merged states, -1 if none:
                            for fixed / dla the old pair (merge_slot - 1, merge_slot) merged
                            before everything moved one slot older; for fenwick levels
                            0 .. merge_slot - 1 folded into level merge_slot
    n [B, T, H, L]          tokens held by each slot after the token (the slot layout)
    pos [B, T]              the token's position in its sequence
    ======================  ==================================================================
    """

    score: np.ndarray
    opened: np.ndarray
    merge_slot: np.ndarray
    n: np.ndarray
    pos: np.ndarray

    @property
    def occupancy(self) -> np.ndarray:
        """States in the cache after each token: [B, T, H]."""
        return (self.n > 0).sum(-1)

    def boundaries(self, b: int = 0, h: int = 0) -> np.ndarray:
        """Positions (in the sequence) of the tokens that opened a state."""
        return self.pos[b][self.opened[b, :, h]]

    def slot_map(self, b: int = 0, h: int = 0) -> np.ndarray:
        """slot_t(s) over row b's non-padding tokens: [T', T'] int, the slot at time t of the state
        holding token s, -1 where s > t or s belongs to another sequence. DLA's output is the base
        model's attention matrix masked by ``lam_t[slot_t(s)]`` (DESIGN section 2)."""
        idx = np.flatnonzero(self.pos[b] >= 0)
        pos = self.pos[b, idx]
        out = np.full((len(idx), len(idx)), -1)
        for i, t in enumerate(idx):
            j = np.arange(i + 1)
            same = pos[i] - pos[j] == i - j  # contiguous positions: the same sequence
            ends = pos[i] + 1 - np.cumsum(self.n[b, t, h])  # slot k holds positions [ends[k], ends[k-1])
            out[i, j[same]] = np.searchsorted(-ends, -pos[j[same]], side="left")
        return out

    def spans(self, b: int = 0, t: int = -1, h: int = 0) -> list[tuple[int, int]]:
        """The cache after token t as half-open position spans [start, end), slot 0 (newest) first."""
        end = int(self.pos[b, t]) + 1
        spans = []
        for count in self.n[b, t, h]:
            spans.append((end - int(count), end))
            end -= int(count)
        return spans


def dla_attention(q, k, v, g, lam=None, beta=None, *, config: DLAConfig, scale=1.0, mask=None,
                  initial_state=None, output_final_state=False, cu_seqlens=None):
    o, state, _ = _run(q, k, v, g, lam, beta, config, scale, mask, initial_state, cu_seqlens)
    return o, (dataclasses.replace(state, config=config) if output_final_state else None)


def inspect(q, k, v, g, beta=None, *, config: DLAConfig, mask=None, initial_state=None, cu_seqlens=None) -> Trace:
    """Run the cache over a sequence and report, per token and head, what it did (see `Trace`).
    With a per-head ``config.threshold``, head h opens where its score is >= threshold[h]."""
    return _run(q, k, v, g, None, beta, config, 1.0, mask, initial_state, cu_seqlens)[2]


def _run(q, k, v, g, lam, beta, config, scale, mask, initial_state, cu_seqlens):
    arrays = [None if x is None else np.asarray(x) for x in (q, k, v, g, lam, beta, mask, cu_seqlens)]
    q, k, v, g, lam, beta, mask, cu_seqlens = arrays
    B, T, H, Dk, Dv, L, N = check_inputs(config, q, k, v, g, lam, beta, mask, initial_state, cu_seqlens,
                                         is_float=lambda x: np.issubdtype(x.dtype, np.floating), scale=scale)
    f64 = lambda x: None if x is None else np.asarray(x, np.float64)
    q, k, v, g, lam, beta = map(f64, (q, k, v, g, lam, beta))
    lam = np.ones((B, T, H, L)) if lam is None else lam
    beta_of = (lambda b, t, h: 1.0) if beta is None else (lambda b, t, h: beta[b, t, h])
    empty = lambda: DLAState(np.zeros((N, H, L, Dk, Dv)), np.zeros((N, H, L), np.int64), np.zeros((N, H, L)),
                             np.zeros(N, np.int64), np.zeros((N, H), np.int64))
    init = canonical((initial_state or empty()).map(lambda f, x: np.asarray(x)))
    init = {f: getattr(init, f) for f in DLAState.FIELDS}
    thresholds = config.thresholds(H)

    # Each sequence: (row, first token, end); with cu_seqlens all sit in row 0.
    if cu_seqlens is None:
        sequences = [(b, 0, T) for b in range(B)]
    else:
        sequences = [(0, int(s), int(e)) for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])]

    o = np.zeros((B, T, H, Dv))
    final = empty()
    trace = Trace(np.full((B, T, H), np.nan), np.zeros((B, T, H), bool), np.full((B, T, H), -1),
                  np.zeros((B, T, H, L), np.int64), np.full((B, T), -1))
    for i, (b, start, end) in enumerate(sequences):
        for h in range(H):
            head_config = dataclasses.replace(config, threshold=float(thresholds[h]))
            S = init["S"][i, h].astype(np.float64)
            n, ibar, pos = init["n"][i, h].astype(np.int64), init["ibar"][i, h].astype(np.float64), int(init["pos"][i])
            opened = int(init["opened"][i, h])
            for t in range(start, end):
                if mask is not None and not mask[b, t]:
                    trace.n[b, t, h] = n
                    continue
                bt = beta_of(b, t, h)
                # Transition every state: exp(g) (I - beta k k^T) S, or exp(g) S.
                if beta is None:
                    S = np.exp(g[b, t, h]) * S
                else:
                    kk = np.outer(k[b, t, h], k[b, t, h])
                    S = np.exp(g[b, t, h]) * (S - bt * kk @ S)
                token = bt * np.outer(k[b, t, h], v[b, t, h])
                score = _score(config, S[0], token) if n.any() else 0.0
                s = policy.step(head_config, n, ibar, pos, score)
                opened += s.opened and pos > 0
                S, n, ibar = (policy.apply(s.dest, x) for x in (S, n, ibar))
                S[0] += token
                n[0] += 1
                ibar[0] += score if config.scored else 0.0
                o[b, t, h] = scale * np.einsum("l,d,ldv->v", lam[b, t, h], q[b, t, h], S)
                trace.score[b, t, h], trace.opened[b, t, h], trace.merge_slot[b, t, h] = score, s.opened, s.merge_slot
                trace.n[b, t, h] = n
                trace.pos[b, t] = pos
                pos += 1
            final.S[i, h], final.n[i, h], final.ibar[i, h], final.pos[i], final.opened[i, h] = S, n, ibar, pos, opened
    return o, final, trace


def _score(config: DLAConfig, state, token) -> float:
    """Eq. 13 with R(.) materialized: the reading ``config.score`` names."""
    R = lambda X: X / np.sqrt(np.mean(X**2) + config.eps)
    other = token if config.score == "token_drift" else state + token
    return float(np.linalg.norm(R(other) - R(state)) / (np.linalg.norm(R(state)) + config.eps))
