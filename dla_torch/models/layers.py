"""Building blocks shared by the DLA models: norms, the causal short convolution, read weights."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dla_shared import DLAState


class RMSNorm(nn.Module):
    """RMS normalization in float32, optionally gated by silu(gate) first and normalized per group."""

    def __init__(self, size: int, eps: float = 1e-6, group_size: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.group_size = group_size or size

    def forward(self, x, gate=None):
        dtype = x.dtype
        x = x.float()
        if gate is not None:
            x = x * F.silu(gate.float())
        groups = x.unflatten(-1, (-1, self.group_size))
        x = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    """The gated (SwiGLU) MLP of fla's blocks: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def causal_conv(x, weight, bias=None, state=None, seq_ids=None):
    """Depthwise causal convolution over time.

    x [B, T, C]; weight [C, 1, W] (nn.Conv1d's layout); state [B, W - 1, C], the inputs before x (zeros
    if None); seq_ids [B, T] int: taps never reach into another packed sequence. Returns (y [B, T, C],
    new state [B, W - 1, C]).
    """
    B, T, C = x.shape
    W = weight.shape[-1]
    past = x.new_zeros(B, W - 1, C) if state is None else state.to(x.dtype)
    full = torch.cat([past, x], dim=1)  # [B, W - 1 + T, C]
    y = x.new_zeros(B, T, C) if bias is None else bias.to(x.dtype).expand(B, T, C).clone()
    for j in range(W):  # tap j looks j steps back
        tap = full[:, W - 1 - j : W - 1 - j + T] * weight[:, 0, W - 1 - j].to(x.dtype)
        if seq_ids is not None and j > 0:
            same = torch.zeros_like(seq_ids, dtype=torch.bool)
            same[:, j:] = seq_ids[:, j:] == seq_ids[:, :-j]
            tap = tap * same[..., None]
        y = y + tap
    return y, full[:, T:]


def read_weights(dl, L, normalized: bool):
    """lam = softplus(L * dl) per head and slot (Log-Linear's positive mode), divided by softplus(0) = ln 2
    when ``normalized``, so that a zero projection reads every state with weight 1.
    dl [B, T, H, K] from the layer's projection, L [H, K]."""
    lam = F.softplus(L.float() * dl.float())
    return lam / math.log(2) if normalized else lam


@dataclasses.dataclass
class LayerCache:
    """What one layer carries between calls: its convolutions' past inputs and DLA's state."""

    conv: torch.Tensor | tuple | None = None
    state: DLAState | None = None


class CausalLM(nn.Module):
    """``forward(input_ids [B, T], mask=None, cache=None, cu_seqlens=None) -> logits [B, T, V]`` (float32).

    ``mask`` [B, T] bool marks real tokens (False = padding); ``cu_seqlens`` [N + 1] packs N documents in
    one row (B == 1); ``cache`` is `make_cache()`'s list, updated in place, to continue the sequences.
    Subclasses set ``body`` (embeddings, layers, final_norm) and ``lm_head``.
    """

    body: nn.Module
    lm_head: nn.Linear
    activation_checkpointing = False  # in training, recompute each layer in the backward pass

    @property
    def layers(self):
        return self.body.layers

    def make_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in self.layers]

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.body.embeddings.weight

    def forward(self, input_ids, mask=None, cache=None, cu_seqlens=None):
        seq_ids = None
        if cu_seqlens is not None:  # the document of every token, so convolutions stop at document starts
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            seq_ids = (torch.searchsorted(cu_seqlens.to(input_ids.device), positions, right=True) - 1)[None]
        h = self.body.embeddings(input_ids)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            kw = {"mask": mask, "cache": None if cache is None else cache[i], "seq_ids": seq_ids, "cu_seqlens": cu_seqlens}
            h = checkpoint(layer, h, use_reentrant=False, **kw) if recompute else layer(h, **kw)
        return self.lm_head(self.body.final_norm(h).to(self.lm_head.weight.dtype)).float()
