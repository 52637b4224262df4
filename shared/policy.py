"""The cache policies: when a state opens, which states merge, and every state's slot.

The cache of one (batch row, head) is kept newest first: index ``i`` is slot ``i``, and a larger index
is an older state. For ``fixed`` and ``dla`` the states are packed (slot = rank from the newest); for
``fenwick`` index ``i`` is Fenwick level ``i`` and empty levels stay in place. Bookkeeping per cache:

====  =========  ===========================================================
n     int  [L]   tokens held by each slot (0 = empty)
ibar  float [L]  sum of the information scores of each slot's tokens (0 unless `DLAConfig.scored`)
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

# The choices' numbers in the kernels: the one table for Triton and Metal (metal_kernels/dla_common.h's enums
# repeat it, and a test holds them equal).
POLICY_IDS = {"single": 0, "fenwick": 1, "fixed": 2, "dla": 3}
MERGE_IDS = {"oldest": 0, "density": 1}
SCORE_IDS = {"token_drift": 0, "state_drift": 1}


class Step(NamedTuple):
    dest: np.ndarray  # int [L]: new slot of each old slot
    opened: bool  # the token opened a new state
    merge_slot: int  # new slot holding two or more merged old states, -1 if none


def score_from_terms(config: DLAConfig, state_sq, token_sq, cross, size: int, xp=np):
    """Eq. 13 from three scalars, with R(X) = X / sqrt(mean(X^2) + eps) over the flattened matrix.

    state_sq = ||S~||^2, token_sq = ||s_t||^2, cross = <S~, s_t>, size = Dk * Dv; numpy arrays or
    scalars of any shape, computed in their own dtype (or arrays of the namespace ``xp``, e.g. ``mlx.core``).
    S~ is the newest state after this step's transition and before the write. Zeros where no decision reads
    the scores (`DLAConfig.scored`).
    """
    if not config.scored:
        return xp.zeros_like(state_sq)
    eps = config.eps
    r_state = 1.0 / xp.sqrt(state_sq / size + eps)
    if config.score == "token_drift":
        other_sq, other_cross = token_sq, cross
    else:  # state_drift: the other matrix is S~ + s_t
        other_sq, other_cross = state_sq + token_sq + 2 * cross, state_sq + cross
    r_other = 1.0 / xp.sqrt(other_sq / size + eps)
    dist_sq = r_other**2 * other_sq + r_state**2 * state_sq - 2 * r_other * r_state * other_cross
    return xp.sqrt(xp.maximum(dist_sq, 0)) / (r_state * xp.sqrt(state_sq) + eps)


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


def opens(config: DLAConfig, pos, score, xp=np):
    """Whether a token opens a state in a non-empty cache (arrays of the namespace ``xp`` or, for numpy,
    scalars; broadcast; with a per-head threshold, ``score``'s last axis is the head)."""
    if xp is np:
        pos, score = np.asarray(pos), np.asarray(score)
    shape = np.broadcast_shapes(pos.shape, score.shape)
    if config.policy == "single":
        return xp.full(shape, False)
    if config.policy == "fenwick":
        return xp.full(shape, True)
    if config.policy == "fixed":
        return xp.broadcast_to(pos % config.block_size == 0, shape)
    # A per-head threshold [H] meets the score's last axis, its heads.
    return xp.broadcast_to(score >= xp.array(config.threshold), shape)


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


def _astype(x, dtype):
    return x.astype(dtype) if hasattr(x, "astype") else x.to(dtype)  # torch tensors have no astype


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


def plan(config: DLAConfig, n, ibar, pos, score, active, xp=np) -> Plan:
    """`step` for every (row, head) of one token at once, with arrays (the backends' form; the oracle
    calls `step` itself, so the two check each other).

    n [B, H, L], ibar [B, H, L], pos [B], score [B, H] (ignored where the cache is empty), active
    bool [B] (False = padding: nothing changes): numpy arrays, or arrays of the namespace ``xp``
    (``mlx.core``, or `dla_torch.ops.step.Torch` for torch tensors, so that the decisions stay on the device;
    then the caller refuses a fenwick cache that overflows, with `check_levels`, since this raises only for
    numpy). numpy compares float32 scores with the thresholds, and divides the pair sums, in float64, and so do
    the torch namespace and MLX's on the CPU (`dla_mlx.ops.step.Exact`); on its GPU, which has no float64, MLX's
    step does both in float32, so at a float32 tie it can decide otherwise. ``ibar`` keeps the dtype it came in,
    so that a continued sequence rounds the same way.
    """
    B, H, L = n.shape
    slots = xp.arange(L)
    empty = ~(n > 0).any(-1)
    score = _astype(xp.where(empty, 0, score), ibar.dtype)  # an empty cache: I = 0
    on = xp.broadcast_to(active[:, None], (B, H))
    opened = on & (empty | opens(config, pos[:, None], score, xp))
    moves = on & ~empty & opened  # a state opens in a cache that holds some: everything moves
    merge_slot = xp.full((B, H), -1)
    dest = xp.zeros_like(n) + slots
    if config.policy == "fenwick":
        # Levels 0..j fold into j + 1, j = the trailing ones of pos - 1 = the trailing zeros of pos.
        j = _astype(xp.round(xp.log2(_astype(xp.maximum(pos & -pos, 1), xp.float32))), pos.dtype)[:, None]
        if xp is np and (moves & (j + 1 >= L)).any():
            p = int(pos[np.nonzero(moves & (j + 1 >= L))[0][0]])
            raise ValueError(f"policy='fenwick' with capacity={L} levels holds at most {2 ** (L - 1)} tokens; "
                             f"position {p} needs a larger DLAConfig.capacity")
        dest = xp.where(moves[..., None] & (slots <= j[..., None]), j[..., None] + 1, dest)
        merge_slot = xp.where(moves & (j >= 1), j + 1, -1)
    elif config.policy in ("fixed", "dla"):
        m = (n > 0).sum(-1)
        full = moves & (m == L)
        if config.merge == "oldest":
            pair = m - 2
        else:  # the least dense adjacent pair; ties to the oldest (largest index)
            total_n = n[..., :-1] + n[..., 1:]
            density = xp.where(slots[:-1] < (m - 1)[..., None],
                               xp.divide(ibar[..., :-1] + ibar[..., 1:], xp.maximum(total_n, 1)), xp.inf)
            pair = L - 2 - _astype(xp.argmin(xp.flip(density, axis=-1), axis=-1), m.dtype)
        merged = xp.where(full[..., None] & (slots > pair[..., None]), slots - 1, slots)
        dest = xp.where(moves[..., None], xp.minimum(merged + 1, L - 1), dest)
        merge_slot = xp.where(full, pair + 1, -1)
    into = dest[..., :, None] == slots  # [B, H, L old, L new]: old slot j goes to new slot dest[j]
    first = on[..., None] & (slots == 0)
    n = xp.where(into, n[..., :, None], 0).sum(-2) + first
    ibar = xp.where(into, ibar[..., :, None], 0).sum(-2) + xp.where(first, score[..., None], 0)
    return Plan(dest, n, ibar, pos + active, opened, merge_slot)
