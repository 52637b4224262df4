"""The DLA policy configuration: one validated object shared by every backend.

`DLAConfig` names how the state cache opens, merges and labels states (DESIGN section 2):

=============  =========================================================================
policy         ``single`` (one state), ``fenwick`` (Log-Linear's weak Fenwick levels),
               ``fixed`` (a new state every ``block_size`` tokens) or ``dla``
               (information-aware boundaries plus capacity-bounded merging)
capacity       K, the most states the cache holds (``fixed``, ``dla``); for ``fenwick``
               the number of levels, so sequences up to ``2**(capacity - 1)`` tokens
threshold      tau: a ``dla`` boundary opens when the score is ``>= threshold``
score          ``token_drift`` (default) or ``state_drift``, the two readings of Eq. 13
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

POLICIES = ("single", "fenwick", "fixed", "dla")
SCORES = ("token_drift", "state_drift")
MERGES = ("density", "oldest")


@dataclasses.dataclass(frozen=True)
class DLAConfig:
    policy: str = "dla"
    capacity: int = 30
    threshold: float = 0.6
    score: str = "token_drift"
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
        for name in ("threshold", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"DLAConfig.{name} must be a finite number, got {value!r}")
        if self.eps <= 0:
            raise ValueError(f"DLAConfig.eps must be > 0, got {self.eps!r}")
        if self.policy != "single" and self.capacity < 2:
            # One slot leaves no adjacent pair to merge: that cache is policy='single'.
            raise ValueError(f"DLAConfig.capacity must be >= 2 for policy={self.policy!r}, got {self.capacity}")

    @property
    def num_slots(self) -> int:
        """Read weights per head the op expects: ``lam.shape[-1]``."""
        return 1 if self.policy == "single" else self.capacity

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

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
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"DLAConfig.{name} must be an integer >= {minimum}, got {value!r}")


def mlp_size(hidden_size: int, ratio: int = 4) -> int:
    """fla's default gated-MLP width, shared by both backends' models: ratio * hidden * 2 / 3, rounded up
    to a multiple of 256."""
    return 256 * math.ceil(int(hidden_size * ratio * 2 / 3) / 256)
