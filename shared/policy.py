"""The cache policies: when a state opens, which states merge, and every state's slot.

The cache of one (batch row, head) is kept newest first: index ``i`` is slot ``i``, and a larger index
is an older state. For ``fixed`` and ``dla`` the states are packed (slot = rank from the newest); for
``fenwick`` index ``i`` is Fenwick level ``i`` and empty levels stay in place. Bookkeeping per cache:

====  =========  ===========================================================
n     int  [L]   tokens held by each slot (0 = empty)
ibar  float [L]  sum of the information scores of each slot's tokens
pos   int        tokens this row has seen (the position of the next token)
====  =========  ===========================================================

A step never drops a state: it maps every old slot ``j`` to a new slot ``dest[j]`` (several old slots
mapping to one new slot is a merge, states add), then the token is written into slot 0. Backends apply
``dest`` to their states (a scatter-add by slot; `transfer_matrix` is the same map as a 0/1 matrix), so this file is
the only place where the policies live.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .config import DLAConfig

# The policies' numbers in the kernels (Triton and Metal).
POLICY_IDS = {"single": 0, "fenwick": 1, "fixed": 2, "dla": 3}


class Step(NamedTuple):
    dest: np.ndarray  # int [L]: new slot of each old slot
    opened: bool  # the token opened a new state
    merge_slot: int  # new slot holding two or more merged old states, -1 if none


def score_from_terms(config: DLAConfig, state_sq, token_sq, cross, size: int):
    """Eq. 13 from three scalars, with R(X) = X / sqrt(mean(X^2) + eps) over the flattened matrix.

    state_sq = ||S~||^2, token_sq = ||s_t||^2, cross = <S~, s_t>, size = Dk * Dv; numpy arrays or
    scalars of any shape, computed in their own dtype. S~ is the newest state after this step's
    transition and before the write.
    """
    eps = config.eps
    r_state = 1.0 / np.sqrt(state_sq / size + eps)
    if config.score == "token_drift":
        other_sq, other_cross = token_sq, cross
    else:  # state_drift: the other matrix is S~ + s_t
        other_sq, other_cross = state_sq + token_sq + 2 * cross, state_sq + cross
    r_other = 1.0 / np.sqrt(other_sq / size + eps)
    dist_sq = r_other**2 * other_sq + r_state**2 * state_sq - 2 * r_other * r_state * other_cross
    return np.sqrt(np.maximum(dist_sq, 0)) / (r_state * np.sqrt(state_sq) + eps)


def step(config: DLAConfig, n: np.ndarray, ibar: np.ndarray, pos: int, score: float) -> Step:
    """Decide one token's cache update from the bookkeeping before it (see the module docstring)."""
    L = n.shape[0]
    dest = np.arange(L)
    if not n.any():  # an empty cache: the token opens the first state
        return Step(dest, True, -1)
    if config.policy == "single":
        return Step(dest, False, -1)
    if config.policy == "fenwick":
        # Levels 0..j fold into level j + 1, where j is the number of trailing ones of pos - 1.
        j = _trailing_ones(pos - 1)
        if j + 1 >= L:
            raise ValueError(
                f"policy='fenwick' with capacity={L} levels holds at most {2 ** (L - 1)} tokens; "
                f"position {pos} needs a larger DLAConfig.capacity"
            )
        dest[: j + 1] = j + 1
        return Step(dest, True, j + 1 if j >= 1 else -1)
    if not opens(config, pos, score):
        return Step(dest, False, -1)
    m = int(np.count_nonzero(n))
    merge_slot = -1
    if m == L:  # full: merge one adjacent pair (i, i + 1) first, i + 1 being the older
        i = _merge_pair(config, n, ibar)
        dest[i + 1 :] -= 1
        merge_slot = i + 1
    # Shift everything one slot older; the last slot is empty here unless a merge freed one.
    return Step(np.minimum(dest + 1, L - 1), True, merge_slot)


def check_levels(config: DLAConfig, last_pos: int) -> None:
    """For kernels, which cannot raise: refuse on the host a fenwick cache whose levels cannot hold the
    positions a block reaches (``last_pos``: the largest position after it), as `step` would."""
    L = config.num_slots
    if config.policy == "fenwick" and last_pos > 2 ** (L - 1):
        raise ValueError(f"policy='fenwick' with capacity={L} levels holds at most {2 ** (L - 1)} tokens; "
                         f"position {2 ** (L - 1)} needs a larger DLAConfig.capacity")


def opens(config: DLAConfig, pos, score):
    """Whether a token opens a state in a non-empty cache (numpy arrays or scalars, broadcast; with a
    per-head threshold, ``score``'s last axis is the head)."""
    if config.policy == "single":
        return np.zeros(np.broadcast(pos, score).shape, bool)
    if config.policy == "fenwick":
        return np.ones(np.broadcast(pos, score).shape, bool)
    if config.policy == "fixed":
        return np.broadcast_to(pos % config.block_size == 0, np.broadcast(pos, score).shape)
    # A per-head threshold [H] meets the score's last axis, its heads.
    return np.broadcast_to(score >= np.asarray(config.threshold), np.broadcast(pos, score).shape)


def apply(dest: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Move bookkeeping ``x`` [L] by ``dest``, summing what merges."""
    out = np.zeros_like(x)
    np.add.at(out, dest, x)
    return out


def transfer_matrix(dest: np.ndarray, dtype=np.float32) -> np.ndarray:
    """``P [L, L]`` with ``P[dest[j], j] = 1``, so that new states = P @ old states."""
    L = dest.shape[-1]
    P = np.zeros(dest.shape + (L,), dtype)
    np.put_along_axis(P, dest[..., None, :], 1, axis=-2)
    return P


def merge_densities(n: np.ndarray, ibar: np.ndarray) -> np.ndarray:
    """Density of each adjacent pair (i, i + 1) of the occupied, packed slots: [m - 1]."""
    m = int(np.count_nonzero(n))
    return (ibar[: m - 1] + ibar[1:m]) / (n[: m - 1] + n[1:m])


def _merge_pair(config, n, ibar) -> int:
    m = int(np.count_nonzero(n))
    if config.merge == "oldest":
        return m - 2
    density = merge_densities(n, ibar)
    # Ties go to the oldest pair, the largest index.
    return m - 2 - int(np.argmin(density[::-1]))


def _trailing_ones(x: int) -> int:
    return (~x & (x + 1)).bit_length() - 1


class Plan(NamedTuple):
    """One token's decisions for every (row, head); the bookkeeping after it."""

    dest: np.ndarray  # int [B, H, L]: new slot of each old slot (identity where inactive)
    n: np.ndarray  # [B, H, L]
    ibar: np.ndarray  # [B, H, L]
    pos: np.ndarray  # [B]
    opened: np.ndarray  # bool [B, H]
    merge_slot: np.ndarray  # int [B, H]


def plan(config: DLAConfig, n, ibar, pos, score, active) -> Plan:
    """`step` for every (row, head) of one token at once, with arrays (the backends' form; the oracle
    calls `step` itself, so the two check each other).

    n [B, H, L], ibar [B, H, L], pos [B], score [B, H] (ignored where the cache is empty), active
    bool [B] (False = padding: nothing changes). ``ibar`` keeps the dtype it came in, so that a
    continued sequence rounds the same way.
    """
    B, H, L = n.shape
    slots = np.arange(L)
    empty = ~n.any(-1)
    score = np.where(empty, 0, score).astype(ibar.dtype)  # an empty cache: I = 0
    on = np.broadcast_to(active[:, None], (B, H))
    opened = on & (empty | opens(config, pos[:, None], score))
    moves = on & ~empty & opened  # a state opens in a cache that holds some: everything moves
    merge_slot = np.full((B, H), -1)
    if config.policy == "fenwick":
        j = np.array([_trailing_ones(int(p) - 1) for p in pos])[:, None]  # levels 0..j fold into j + 1
        if (moves & (j + 1 >= L)).any():
            p = int(pos[np.nonzero(moves & (j + 1 >= L))[0][0]])
            raise ValueError(f"policy='fenwick' with capacity={L} levels holds at most {2 ** (L - 1)} tokens; "
                             f"position {p} needs a larger DLAConfig.capacity")
        dest = np.where(moves[..., None] & (slots <= j[..., None]), j[..., None] + 1, slots)
        merge_slot = np.where(moves & (j >= 1), j + 1, -1)
    elif config.policy in ("fixed", "dla"):
        m = (n > 0).sum(-1)
        full = moves & (m == L)
        if config.merge == "oldest":
            pair = m - 2
        else:  # the least dense adjacent pair; ties to the oldest (largest index)
            total_n = n[..., :-1] + n[..., 1:]
            density = np.where(slots[:-1] < (m - 1)[..., None],
                               (ibar[..., :-1] + ibar[..., 1:]) / np.maximum(total_n, 1), np.inf)
            pair = L - 2 - np.argmin(density[..., ::-1], axis=-1)
        merged = np.where(full[..., None] & (slots > pair[..., None]), slots - 1, slots)
        dest = np.where(moves[..., None], np.minimum(merged + 1, L - 1), slots)
        merge_slot = np.where(full, pair + 1, -1)
    else:
        dest = np.broadcast_to(slots, (B, H, L))
    transfer = transfer_matrix(dest, ibar.dtype)
    n = np.einsum("bhij,bhj->bhi", transfer.astype(n.dtype), n)
    ibar = np.einsum("bhij,bhj->bhi", transfer, ibar)
    n[..., 0] += on
    ibar[..., 0] += np.where(on, score, 0)
    return Plan(np.ascontiguousarray(dest), n, ibar, pos + active, opened, merge_slot)
