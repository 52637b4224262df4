"""The DLA policy configuration: one validated object shared by every backend.

`DLAConfig` names how the state cache opens, merges and labels states (DESIGN section 2):

=============  =========================================================================
policy         ``single`` (one state), ``fenwick`` (Log-Linear's weak Fenwick levels),
               ``fixed`` (a new state every ``block_size`` tokens) or ``dla``
               (information-aware boundaries plus capacity-bounded merging)
capacity       K, the most states the cache holds (``fixed``, ``dla``); for ``fenwick``
               the number of levels, so sequences up to ``2**(capacity - 1)`` tokens
threshold      tau: a ``dla`` boundary opens when the score is ``>= threshold``; one number
               for every head, or a sequence of one number per head (``[H]``)
target_rate    the share of tokens that should open a state, per head: training moves
               each head's threshold toward it after every optimizer step, and
               calibration sets it (``None``: keep the thresholds as given)
score          ``state_drift`` (default) or ``token_drift``, the two readings of Eq. 13
merge          which adjacent pair merges when the cache is full: ``density`` (least
               information density) or ``oldest`` (the two oldest states)
block_size     the block length of the ``fixed`` policy
eps            the epsilon of the RMS normalization and of the score's denominator
=============  =========================================================================
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers

import numpy as np

POLICIES = ("single", "fenwick", "fixed", "dla")
SCORES = ("token_drift", "state_drift")
MERGES = ("density", "oldest")


@dataclasses.dataclass(frozen=True)
class DLAConfig:
    policy: str = "dla"
    capacity: int = 30
    threshold: float | tuple[float, ...] = 0.6
    target_rate: float | None = 0.125
    score: str = "state_drift"
    merge: str | None = None
    block_size: int = 64
    eps: float = 1e-6

    def __post_init__(self):
        _check_choice("policy", self.policy, POLICIES)
        _check_choice("score", self.score, SCORES)
        if self.merge is None:
            # The paper's DLA merges by density; `oldest` is the plain baseline elsewhere.
            object.__setattr__(self, "merge", "density" if self.policy == "dla" else "oldest")
        _check_choice("merge", self.merge, MERGES)
        _check_int("capacity", self.capacity, 1)
        _check_int("block_size", self.block_size, 1)
        object.__setattr__(self, "capacity", int(self.capacity))
        object.__setattr__(self, "block_size", int(self.block_size))
        object.__setattr__(self, "threshold", _check_threshold(self.threshold))
        object.__setattr__(self, "eps", _check_number("eps", self.eps))
        if self.target_rate is not None:
            rate = _check_number("target_rate", self.target_rate)
            if not 0 < rate < 1:
                raise ValueError(f"DLAConfig.target_rate must be in (0, 1) or None, got {self.target_rate!r}")
            object.__setattr__(self, "target_rate", rate)
        if self.eps <= 0:
            raise ValueError(f"DLAConfig.eps must be > 0, got {self.eps!r}")
        if self.policy != "single" and self.capacity < 2:
            # One slot leaves no adjacent pair to merge: that cache is policy='single'.
            raise ValueError(f"DLAConfig.capacity must be >= 2 for policy={self.policy!r}, got {self.capacity}")

    @property
    def scored(self) -> bool:
        """Whether a decision reads the information scores: ``dla``'s boundaries, or density merges (``fixed``).
        Elsewhere no score is computed: every token's is 0, so each state's ``ibar`` stays 0 (DESIGN section 2),
        and the decisions need no pass over the data."""
        return self.policy == "dla" or (self.policy == "fixed" and self.merge == "density")

    @property
    def num_slots(self) -> int:
        """Read weights per head the op expects: ``lam.shape[-1]``."""
        return 1 if self.policy == "single" else self.capacity

    def thresholds(self, num_heads: int) -> np.ndarray:
        """The threshold of every head: float64 [num_heads]. A per-head threshold must have one value
        per head of the op's input."""
        if isinstance(self.threshold, tuple):
            if len(self.threshold) != num_heads:
                raise ValueError(f"DLAConfig.threshold has {len(self.threshold)} values, one per head, but the "
                                 f"input has H = {num_heads} heads")
            return np.array(self.threshold, np.float64)
        return np.full(num_heads, self.threshold, np.float64)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if isinstance(self.threshold, tuple):
            data["threshold"] = list(self.threshold)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "DLAConfig":
        if not isinstance(data, dict):
            raise TypeError(f"DLAConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DLAConfig field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "DLAConfig":
        return cls.from_dict(json.loads(text))


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"DLAConfig.{name} must be one of {list(choices)}, got {value!r}")


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"DLAConfig.{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"DLAConfig.{name} must be a finite number, got {value!r}")
    return float(value)


def _check_threshold(value) -> float | tuple[float, ...]:
    """A number, or a sequence of numbers (one per head; a list, tuple or 1-D array) as a tuple."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) == 0 or any(isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x)
                                  for x in np.asarray(value, object).ravel()) or np.ndim(value) != 1:
            raise ValueError(f"DLAConfig.threshold must be a finite number or a non-empty sequence of finite "
                             f"numbers (one per head), got {value!r}")
        return tuple(float(x) for x in value)
    return _check_number("threshold", value)


def mlp_size(hidden_size: int, ratio: int = 4) -> int:
    """fla's default gated-MLP width, shared by both backends' models: ratio * hidden * 2 / 3, rounded up
    to a multiple of 256."""
    return 256 * math.ceil(int(hidden_size * ratio * 2 / 3) / 256)
