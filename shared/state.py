"""The state object every backend returns and accepts, and the checks of the op's arguments.

`DLAState` holds arrays of the backend that made it (numpy, torch or mlx), same fields and layout:

=====  ===================  ===============================================================
S      [N, H, L, Dk, Dv]    the states, float32 (float64 for float64 inputs); slot i at index i,
                            newest first (see `dla_shared.policy`), unless ``slot`` is given
n      [N, H, L] int64      tokens held by each slot, 0 = empty
ibar   [N, H, L] float      sum of the information scores of each slot's tokens (dtype of S); 0
                            where no decision reads a score (`DLAConfig.scored`)
pos    [N] int64            tokens each sequence has seen
opened [N, H] int64         boundaries so far: tokens after each sequence's first that opened a
                            state (its open rate is ``opened / (pos - 1)``)
slot   [N, H, L] int64      optional (the physical layout): slot i's state is ``decay * S[..., slot[i],
decay  [N, H]               :, :]``, so that a decode step moves no state and rescales none (DESIGN
                            section 3); None: the canonical layout (``slot[i] = i``, ``decay = 1``)
=====  ===================  ===============================================================

The compiled decode step (``impl="cpu"``) keeps states in the physical layout; every other impl takes either
layout (`canonical` gives the other) and returns the canonical one.

N is the batch size, or the number of sequences when ``cu_seqlens`` packs them. The states (in the canonical
layout: `canonical`) always sum to the single-state base model's state, and ``n.sum(-1) == pos`` for every
head. ``slot``, ``decay`` and ``config`` are keyword arguments.

``config`` is the `DLAConfig` the state was made under (every op sets it on the states it returns); a state
continues only under the same cache (policy, capacity, score, merge, block size and thresholds). A state
without one (built by hand or loaded from a file) has its bookkeeping checked when it comes in.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from .config import MERGES, POLICIES, SCORES, DLAConfig


@dataclasses.dataclass
class DLAState:
    S: Any
    n: Any
    ibar: Any
    pos: Any
    opened: Any
    slot: Any = dataclasses.field(default=None, kw_only=True)
    decay: Any = dataclasses.field(default=None, kw_only=True)
    config: DLAConfig | None = dataclasses.field(default=None, kw_only=True)

    FIELDS = ("S", "n", "ibar", "pos", "opened")  # the arrays every state has
    LAYOUT = ("slot", "decay")  # the arrays of the physical layout

    def fields(self) -> tuple:
        """The names of the arrays this state holds: `FIELDS`, and `LAYOUT` in the physical layout."""
        return self.FIELDS if self.slot is None else self.FIELDS + self.LAYOUT

    def map(self, fn) -> "DLAState":
        """The state with ``fn(name, array)`` applied to each of its arrays (same config)."""
        return dataclasses.replace(self, **{f: fn(f, getattr(self, f)) for f in self.fields()})

    @property
    def num_states(self):
        """Occupied slots per (sequence, head): [N, H]."""
        return (self.n > 0).sum(-1)


def canonical(state: DLAState, take_along_axis=np.take_along_axis) -> DLAState:
    """``state`` in the canonical layout (slot i at index i; itself if it is): one gather and product of the
    states. ``take_along_axis(a, indices, axis)`` is the backend's (numpy's, ``mx.take_along_axis``,
    ``torch.take_along_dim``)."""
    if state.slot is None:
        return state
    S = take_along_axis(state.S, state.slot[..., None, None], 2) * state.decay[..., None, None, None]
    return dataclasses.replace(state, S=S, slot=None, decay=None)


def physical(state: DLAState, arange, ones) -> DLAState:
    """``state`` in the physical layout (itself if it is): ``slot[i] = i`` and ``decay = 1`` made with the
    backend's ``arange(L)`` and ``ones(shape, dtype=...)``, on the default device."""
    if state.slot is not None:
        return state
    N, H, L = state.n.shape
    return dataclasses.replace(state, slot=state.n * 0 + arange(L), decay=ones((N, H), dtype=state.S.dtype))


def decay_floor(eps: float) -> float:
    """The chunk paths' floor on g for a dtype of machine epsilon ``eps``: a decay of exp(floor) ~ eps / 12
    is nothing next to 1, and a finite floor keeps gamma_j / gamma_s = exp(cum_j - cum_s) out of
    -inf - (-inf) = NaN when g = -inf (a full reset) or is large and negative."""
    return math.log(eps) - 2.5


def check_inputs(config, q, k, v, g, lam, beta, mask, initial_state, cu_seqlens, *, is_float: Callable,
                 scale=1.0, array_type: type | None = None, check_decay: bool = True):
    """Validate the op's arguments; return (B, T, H, Dk, Dv, L, N). Errors name the argument.

    ``is_float(x)`` tells whether a backend array has a floating dtype; ``array_type`` (torch.Tensor,
    mx.array) is the type of the backend's arrays, which q, k, v, g, lam, beta and the state's fields must be
    (mask and cu_seqlens may be any array-like: the backends convert them before this check).
    ``check_decay`` refuses g > 0, the one check that reads values (a host sync).
    """
    if not isinstance(config, DLAConfig):
        raise TypeError(f"config must be a DLAConfig, got {type(config).__name__}")
    try:  # a Python or numpy number, or a 0-d array
        finite = not isinstance(scale, (bool, str)) and np.ndim(scale) == 0 and math.isfinite(float(scale))
    except (TypeError, ValueError):
        finite = False
    if not finite:
        raise TypeError(f"scale must be a finite number, got {scale!r}")
    if array_type is not None:
        named = {"q": q, "k": k, "v": v, "g": g, "lam": lam, "beta": beta}
        if isinstance(initial_state, DLAState):
            named |= {f"initial_state.{f}": getattr(initial_state, f) for f in initial_state.fields()}
        for name, x in named.items():
            if x is not None and not isinstance(x, array_type):
                raise TypeError(f"{name} must be a {array_type.__module__}.{array_type.__name__} for this backend's "
                                f"op, got {type(x).__module__}.{type(x).__name__}")
    if len(q.shape) != 4:
        raise ValueError(f"q must be [B, T, H, Dk], got shape {tuple(q.shape)}")
    B, T, H, Dk = q.shape
    if H == 0 or Dk == 0:  # B = 0 (no sequences) and T = 0 (no tokens) are calls with nothing to compute
        raise ValueError(f"q [B, T, H, Dk] must have at least one head and key dimension, got shape "
                         f"{tuple(q.shape)}")
    config.thresholds(H)  # a per-head threshold has one value per head
    if len(v.shape) != 4:
        raise ValueError(f"v must be [B, T, H, Dv], got shape {tuple(v.shape)}")
    Dv = v.shape[-1]
    L = config.num_slots
    expected = {
        "k": (B, T, H, Dk),
        "v": (B, T, H, Dv),
        "g": (B, T, H),
        "lam": (B, T, H, L),
        "beta": (B, T, H),
    }
    tensors = {"q": q, "k": k, "v": v, "g": g, "lam": lam, "beta": beta}
    for name, x in tensors.items():
        if x is None and name in ("lam", "beta"):
            continue
        if name != "q" and tuple(x.shape) != expected[name]:
            hint = (f" (lam.shape[-1] must be config.num_slots = {L} for policy={config.policy!r})"
                    if name == "lam" else "")
            raise ValueError(f"{name} must have shape {list(expected[name])} [B, T, H, ...], got {list(x.shape)}{hint}")
        if not is_float(x):
            raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if check_decay and bool((g > 0).any()):
        raise ValueError(f"g must be <= 0 (the log of a decay in (0, 1]; -inf resets), got a maximum of "
                         f"{float(g.max())}")
    N = B
    if mask is not None:
        if tuple(mask.shape) != (B, T):
            raise ValueError(f"mask must have shape [B, T] = {[B, T]}, got {list(mask.shape)}")
        if "bool" not in str(mask.dtype):
            raise TypeError(f"mask must be a bool array (False = padding), got {mask.dtype}")
    if cu_seqlens is not None:
        if mask is not None:
            raise ValueError("pass either mask or cu_seqlens, not both")
        if B != 1:
            raise ValueError(f"cu_seqlens needs the sequences packed in one row (B == 1), got B = {B}")
        if len(cu_seqlens.shape) != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens must be a 1-D integer array [N + 1], got shape {list(cu_seqlens.shape)}")
        if is_float(cu_seqlens) or "bool" in str(cu_seqlens.dtype):
            dtype = str(cu_seqlens.dtype).split(".")[-1]
            raise ValueError(f"cu_seqlens must be a 1-D integer array [N + 1], got dtype {dtype}")
        bounds = [int(x) for x in cu_seqlens.tolist()]
        if bounds[0] != 0 or bounds[-1] != T or any(a > b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to T = {T}, got {bounds}")
        N = len(bounds) - 1
    if initial_state is not None:
        if not isinstance(initial_state, DLAState):
            raise TypeError(f"initial_state must be a DLAState, got {type(initial_state).__name__}")
        shapes = {
            "S": (N, H, L, Dk, Dv),
            "n": (N, H, L),
            "ibar": (N, H, L),
            "pos": (N,),
            "opened": (N, H),
        }
        if (initial_state.slot is None) != (initial_state.decay is None):
            raise ValueError("initial_state.slot and initial_state.decay come together (the physical layout) or "
                             "not at all")
        if initial_state.slot is not None:
            shapes |= {"slot": (N, H, L), "decay": (N, H)}
        for name, shape in shapes.items():
            got = tuple(getattr(initial_state, name).shape)
            if got != shape:
                raise ValueError(f"initial_state.{name} must have shape {list(shape)}, got {list(got)}")
        if initial_state.config is None:
            check_bookkeeping(initial_state)
        elif cache_key(initial_state.config, H) != cache_key(config, H):
            raise ValueError(f"initial_state was made under {_describe(initial_state.config, H)}, but config is "
                             f"{_describe(config, H)}; a state continues only under the cache that made it")
    return B, T, H, Dk, Dv, L, N


def cache_key(config: DLAConfig, H: int) -> tuple:
    """What a state's meaning depends on: policy, slots, score, merge, block size and per-head thresholds."""
    return (config.policy, config.num_slots, config.score, config.merge, config.block_size,
            tuple(float(t) for t in config.thresholds(H)))


def cache_signature(config: DLAConfig, H: int) -> np.ndarray:
    """`cache_key` as a float32 array [5 + H], for caches that hold only arrays (mlx-lm's ``ArraysCache``,
    saved and loaded with prompt caches)."""
    policy, slots, score, merge, block, tau = cache_key(config, H)
    return np.array([POLICIES.index(policy), slots, SCORES.index(score), MERGES.index(merge), block, *tau], np.float32)


def _describe(config: DLAConfig, H: int) -> str:
    policy, slots, score, merge, block, tau = cache_key(config, H)
    return f"policy={policy!r} with {slots} slots (score={score!r}, merge={merge!r}, block_size={block}, tau={tau})"


def check_bookkeeping(state: DLAState) -> None:
    """Refuse bookkeeping that no op could have made: non-integer or negative counts, slots that do not
    add up to the position, boundaries past it, non-finite scores. Errors name the field."""
    host = lambda x: x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    n, ibar, pos, opened = (host(getattr(state, f)) for f in ("n", "ibar", "pos", "opened"))
    for name, x in (("n", n), ("pos", pos), ("opened", opened)):
        if x.dtype.kind not in "iu":
            raise TypeError(f"initial_state.{name} must hold integers, got {x.dtype}")
        if (x < 0).any():
            raise ValueError(f"initial_state.{name} must be >= 0, got a minimum of {x.min()}")
    if (n.sum(-1) != pos[:, None]).any():
        raise ValueError("initial_state.n must add up to initial_state.pos in every head (each token is in one "
                         f"state), got sums {n.sum(-1).tolist()} for pos {pos.tolist()}")
    if (opened > np.maximum(pos - 1, 0)[:, None]).any():
        raise ValueError(f"initial_state.opened cannot exceed pos - 1 (the tokens after each sequence's first), "
                         f"got {opened.tolist()} for pos {pos.tolist()}")
    if not np.isfinite(ibar).all():
        raise ValueError("initial_state.ibar must be finite")
    if state.slot is not None:
        check_permutation(host(state.slot), "initial_state.slot")
        decay = host(state.decay)
        if not (np.isfinite(decay) & (decay > 0)).all():
            raise ValueError("initial_state.decay must be finite and > 0")


def check_permutation(slot: np.ndarray, name: str) -> None:
    """Refuse a slot map [..., L] (numpy) that is not, for every (sequence, head), a permutation of the buffers
    0..L - 1: the compiled step indexes the states with it."""
    if slot.dtype.kind not in "iu" or (np.sort(slot, axis=-1) != np.arange(slot.shape[-1])).any():
        raise ValueError(f"{name} must give each (sequence, head) a permutation of its buffers "
                         f"0..{slot.shape[-1] - 1}")
