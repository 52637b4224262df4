"""What the MLX DLA models share: norms, the causal convolution, read weights, the state cache layout.

The layer cache is a plain mlx-lm ``ArraysCache`` (so `mlx_lm.generate`, batch generation and prompt-cache
files work unchanged) whose entries are the layer's convolution states followed by DLA's state:
``[conv..., S, n, ibar, pos, opened, slot, decay, signature]`` (`ENTRIES`, the state in its physical layout,
then `get_state`'s signature).
"""

from __future__ import annotations

import dataclasses
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_ssm_mask
from mlx_lm.models.cache import ArraysCache

from dla_shared import DLAConfig, DLAState
from dla_shared.state import cache_signature, physical

# Parameters kept out of quantization and of dtype casts: decay, skip, read weights and their projections,
# thresholds.
PRECISE = ("A_log", "dt_bias", ".D", ".L", "l_proj", "a_proj", "b_proj", ".tau")


class RMSNorm(nn.Module):
    """RMS normalization in float32, normalized per group (the mirror of the torch models' RMSNorm)."""

    def __init__(self, size: int, eps: float = 1e-6, group_size: int | None = None):
        super().__init__()
        self.weight = mx.ones((size,))
        self.eps = eps
        self.group_size = group_size or size

    def __call__(self, x, gate=None):
        dtype = x.dtype
        x = x.astype(mx.float32)
        if gate is not None:
            x = x * nn.silu(gate.astype(mx.float32))
        groups = x.reshape(*x.shape[:-1], -1, self.group_size)
        x = (groups * mx.rsqrt((groups * groups).mean(-1, keepdims=True) + self.eps)).reshape(x.shape)
        return self.weight * x.astype(dtype)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


def causal_conv(x, weight, bias=None, state=None, lengths=None):
    """Depthwise causal convolution over time. x [B, T, C]; weight [C, W, 1] (MLX's Conv1d layout);
    state [B, W - 1, C] the inputs before x. Returns (y [B, T, C], the next state [B, W - 1, C]); with
    ``lengths`` (right padding) the next state ends at each row's last real input."""
    B, T, C = x.shape
    W = weight.shape[1]
    if state is not None and state.shape[0] != B:
        raise ValueError(f"the cache holds {state.shape[0]} sequences but the input has batch size {B}; make a "
                         "cache for this batch (model.make_cache())")
    past = mx.zeros((B, W - 1, C), dtype=x.dtype) if state is None else state.astype(x.dtype)
    full = mx.concatenate([past, x], axis=1)
    y = sum(full[:, j : j + T] * weight[:, j, 0].astype(x.dtype) for j in range(W))
    if bias is not None:
        y = y + bias.astype(x.dtype)
    if lengths is None:
        return y, full[:, T:]
    ends = mx.clip(lengths, 0, T)
    return y, mx.take_along_axis(full, (ends[:, None] + mx.arange(W - 1))[..., None], axis=1)


def read_weights(dl, L, normalized: bool):
    """lam = softplus(L * dl) (/ ln 2 when ``normalized``); dl [B, T, H, K], L [H, K]."""
    lam = nn.softplus(L.astype(mx.float32) * dl.astype(mx.float32))
    return lam / math.log(2) if normalized else lam


class DLAMixer(nn.Module):
    """What every DLA mixer shares: ``tau`` [H] float32, the thresholds of its heads (the torch models'
    buffer of the same name), a frozen array: saved, loaded and converted with the weights, never trained,
    kept out of quantization and casts (`PRECISE`). ``op_config()`` is the op's config with them."""

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.tau = mx.array(args.dla.thresholds(args.num_heads), dtype=mx.float32)
        self.freeze(keys="tau", recurse=False)

    def op_config(self) -> DLAConfig:
        return dataclasses.replace(self.args.dla, threshold=tuple(self.tau.tolist()))


def dla_mixers(model) -> list[DLAMixer]:
    """The DLA mixers of a model, in layer order."""
    return [m for layer in model.layers for m in layer.children().values() if isinstance(m, DLAMixer)]


ENTRIES = DLAState.FIELDS + DLAState.LAYOUT  # a layer cache's DLA entries, then the signature


def get_state(cache, first: int, config: DLAConfig, H: int):
    """The DLAState kept in ``cache[first:first + 7]`` (`ENTRIES`, the physical layout), or None before the
    first call. ``cache[first + 7]`` [N, 5 + H] holds the signature of the cache that made it
    (`cache_signature`), so a cache made by a model with another DLA config (a prompt cache loaded into another
    model), or by an older version of this library, is refused."""
    if cache is None or cache[first] is None:
        return None
    stored = cache[first + len(ENTRIES)] if len(cache.cache) == first + len(ENTRIES) + 1 else None
    if stored is None or not (np.array(stored) == cache_signature(config, H)).all():
        raise ValueError(f"this cache was made by a model whose DLA cache differs from this model's "
                         f"(policy={config.policy!r}, {config.num_slots} slots, its thresholds) or by an older "
                         "version of dla; make a new one with model.make_cache()")
    return DLAState(**{f: cache[first + i] for i, f in enumerate(ENTRIES)}, config=config)


def set_state(cache, first: int, state: DLAState):
    # Always in the physical layout, so that mlx-lm's batch operations (filter, extend, merge) find one shape.
    state = physical(state, mx.arange, mx.ones)
    for i, field in enumerate(ENTRIES):
        cache[first + i] = getattr(state, field)
    # One row per sequence, so that the batch operations carry it as the rest.
    signature = cache_signature(state.config, state.n.shape[1])
    cache[first + len(ENTRIES)] = mx.broadcast_to(mx.array(signature), (state.n.shape[0], signature.size))


def offsets(sizes):
    """Split points for mx.split from part sizes."""
    return [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]


class CausalLM(nn.Module):
    """The mlx-lm model contract: ``__call__(inputs, cache=None) -> logits``, ``layers``, ``make_cache``,
    ``sanitize``, ``quant_predicate``, ``cast_predicate``. Subclasses set ``body`` (embeddings, layers,
    final_norm), ``lm_head`` unless embeddings are tied, and ``conv_states`` (convolutions per layer)."""

    conv_states = 1

    def __call__(self, inputs, cache=None, input_embeddings=None):
        body = self.body
        if input_embeddings is None and inputs.size:
            # MLX's embedding lookup does not check: an id past the table reads whatever memory follows it
            low, high = mx.stack([mx.min(inputs), mx.max(inputs)]).tolist()  # one host sync
            if low < 0 or high >= self.args.vocab_size:
                raise ValueError(f"token ids must be in [0, vocab_size = {self.args.vocab_size}), got ids from "
                                 f"{low} to {high}")
        h = body.embeddings(inputs) if input_embeddings is None else input_embeddings
        cache = cache or [None] * len(self.layers)
        mask = create_ssm_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        h = body.final_norm(h)
        if self.args.tie_word_embeddings:
            return body.embeddings.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self):
        return self.body.layers

    def make_cache(self, batch_size: int = 1):
        return [ArraysCache(size=self.conv_states + len(ENTRIES) + 1) for _ in self.layers]

    def sanitize(self, weights):
        """Torch checkpoints store depthwise convolution weights [C, 1, W]; MLX's are [C, W, 1]. A checkpoint
        without thresholds (made before them) gets every layer's ``tau`` from the config. Idempotent."""
        weights = {k: v.moveaxis(2, 1) if "conv1d.weight" in k and v.shape[-1] != 1 else v for k, v in weights.items()}
        if not any(k.endswith(".tau") for k in weights):
            weights |= {k: v for k, v in tree_flatten(self.parameters()) if k.endswith(".tau")}
        return weights

    @property
    def quant_predicate(self):
        return lambda path, module: hasattr(module, "to_quantized") and not any(p in path for p in PRECISE)

    @property
    def cast_predicate(self):
        return lambda path: not any(path.endswith(p) or p + "." in path for p in PRECISE)
