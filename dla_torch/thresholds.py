"""The threshold controller of DESIGN section 2: after every optimizer step, each layer's and head's
``tau <- tau * exp(eta * (rate - target))``, ``rate`` the share of the step's tokens (after each sequence's
first, padding excluded) that opened a state in that head. Deterministic, no gradient.

    counts = sum of step_counts(mixers) over the step's micro-batches   # all_reduce it across ranks
    rate = follow_target_rate(mixers, counts, target_rate, eta)
"""

from __future__ import annotations

import torch

from .models.base import DLAMixer


def step_counts(mixers: list[DLAMixer]) -> torch.Tensor:
    """The last training forward's boundaries per layer and head, and its tokens: int64 [layers, H + 1]
    (`DLAMixer.boundaries`)."""
    return torch.stack([torch.cat([opened, tokens.reshape(1)]) for opened, tokens in
                        (mixer.boundaries for mixer in mixers)])


@torch.no_grad()
def follow_target_rate(mixers: list[DLAMixer], counts: torch.Tensor, target_rate: float | None,
                       eta: float) -> torch.Tensor:
    """Move every head's tau toward ``target_rate`` (None: leave it) from a step's ``counts`` [layers, H + 1]
    (summed over micro-batches and ranks); a layer that saw no tokens keeps its tau. Returns the step's
    boundary rates, float64 [layers, H] on the CPU."""
    opened, tokens = counts[:, :-1].double(), counts[:, -1:].double()
    rate = opened / tokens
    if target_rate is not None:
        factor = torch.where(tokens > 0, torch.exp(eta * (rate - target_rate)), 1.0)
        for mixer, f in zip(mixers, factor):
            mixer.tau.copy_(mixer.tau.double() * f)
    return rate.cpu()
