"""`dla_attention` for MLX: argument checks, dtypes, packed sequences, and the choice of impl."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np

from dla_shared import DLAConfig, DLAState, decode
from dla_shared.state import canonical, check_inputs

from .chunk import dla_chunk
from .metal import dla_metal
from .reference import dla_reference
from .step import dla_cpu, dla_step

IMPLS = {"reference": dla_reference, "step": dla_step, "cpu": dla_cpu, "chunk": dla_chunk, "metal": dla_metal}


def dla_attention(q, k, v, g, lam=None, beta=None, *, config: DLAConfig, scale: float = 1.0, mask=None,
                  initial_state: DLAState | None = None, output_final_state: bool = False, cu_seqlens=None,
                  impl: str = "auto", check_decay: bool = True):
    """Dynamic Linear Attention (DESIGN section 2); the mirror of `dla_torch.dla_attention`.

    Args:
        q, k: [B, T, H, Dk]. v: [B, T, H, Dv].
        g: [B, T, H] log decay (<= 0); every state is multiplied by exp(g_t).
        lam: [B, T, H, L] read weights, L = config.num_slots (slot 0 = newest state); None = ones.
        beta: [B, T, H] in (0, 1) for the gated delta rule; None for the diagonal transition.
        config: the cache policy (a per-head ``threshold`` has H values). scale: output scale.
        mask: [B, T] bool, False = padding (changes nothing, output zero).
        initial_state: a DLAState to continue from (batch N). output_final_state: return the final one.
        cu_seqlens: [N + 1] int offsets of N sequences packed in one row (B == 1).
        check_decay: refuse g > 0, which reads g on the host (a sync per call); the models, whose g is
            <= 0 by construction, pass False so that decoding never waits on the host.
        impl: "reference" (token by token), "step" (token by token with the decisions on the device, one
            compiled step, differentiable), "cpu" (the step compiled in C, on the host; not differentiable),
            "chunk" (chunkwise MLX ops), "metal" (the Metal decode kernel for one token, else the chunk path
            with the Metal decision scan) or "auto" (metal where Metal exists and the inputs are not float64;
            elsewhere, for one token, cpu where it was built and the default device is the CPU, else step;
            chunk for more). The kernels (metal, cpu) compute no gradients: differentiate with step or chunk.

    Returns:
        o [B, T, H, Dv] in q's dtype, and the final DLAState (float32 states, float64 for float64
        inputs; ``opened`` counts each sequence's and head's boundaries) or None. After "cpu" (what "auto"
        takes to decode on the CPU) the state is in the physical layout (``slot``, ``decay``:
        `dla_shared.state`); ``canonical(state, mx.take_along_axis)`` gives slot i at index i.
    """
    # mask and cu_seqlens may come as lists or numpy arrays, as the numpy oracle takes them
    mask, cu_seqlens = (x if x is None or isinstance(x, mx.array) else mx.array(np.asarray(x))
                        for x in (mask, cu_seqlens))
    B, T, H, Dk, Dv, L, N = check_inputs(config, q, k, v, g, lam, beta, mask, initial_state, cu_seqlens,
                                         is_float=lambda x: mx.issubdtype(x.dtype, mx.floating), scale=scale,
                                         array_type=mx.array, check_decay=check_decay)
    if impl == "auto":
        if mx.metal.is_available() and q.dtype != mx.float64:
            impl = "metal"
        elif T == 1:
            impl = "cpu" if decode.available() and mx.default_device() == mx.cpu else "step"
        else:
            impl = "chunk"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {['auto', *IMPLS]}, got {impl!r}")
    out_dtype = q.dtype
    dtype = mx.float64 if q.dtype == mx.float64 else mx.float32
    cast = lambda x: None if x is None else x.astype(dtype)
    q, k, v, g, beta = map(cast, (q, k, v, g, beta))
    lam = mx.ones((B, T, H, L), dtype=dtype) if lam is None else cast(lam)
    if mask is not None:  # padding may hold anything; zeros keep NaN out of outputs and gradients
        keep = lambda x: None if x is None else mx.where(mask.reshape(B, T, *[1] * (x.ndim - 2)), x, 0)
        q, k, v, g, lam, beta = map(keep, (q, k, v, g, lam, beta))
    state = (empty_state(N, H, L, Dk, Dv, dtype) if initial_state is None
             else _cast_state(initial_state, dtype, layout=impl in ("cpu", "metal")))

    run = lambda s, e, st: IMPLS[impl](q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], lam[:, s:e],
                                       None if beta is None else beta[:, s:e],
                                       None if mask is None else mask[:, s:e], st, config=config, scale=scale)
    if cu_seqlens is None:  # no sequences (B = 0): nothing to run, and the chunk paths reduce over rows
        o, state = run(0, T, state) if B else (mx.zeros((B, T, H, Dv), dtype=dtype), state)
    else:
        bounds = cu_seqlens.tolist()
        pieces = [run(s, e, _index_state(state, i)) for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))]
        o = mx.concatenate([p[0] for p in pieces], axis=1)
        state = DLAState(**{f: mx.concatenate([getattr(p[1], f) for p in pieces]) for f in pieces[0][1].fields()})
    return o.astype(out_dtype), (dataclasses.replace(state, config=config) if output_final_state else None)


def empty_state(N, H, L, Dk, Dv, dtype=mx.float32) -> DLAState:
    """A DLAState with no tokens: N sequences, H heads, L slots."""
    return DLAState(mx.zeros((N, H, L, Dk, Dv), dtype=dtype), mx.zeros((N, H, L), dtype=mx.int64),
                    mx.zeros((N, H, L), dtype=dtype), mx.zeros((N,), dtype=mx.int64), mx.zeros((N, H), dtype=mx.int64))


def _cast_state(state: DLAState, dtype, layout: bool) -> DLAState:
    """States in ``dtype``, in the layout they came in if ``layout`` (for the kernels), else in the canonical
    one; the bookkeeping int64 (ibar and decay in ``dtype``)."""
    state = state if layout else canonical(state, mx.take_along_axis)
    cast = lambda x, d: x if x.dtype == d else x.astype(d)  # astype copies even to the same dtype
    return state.map(lambda f, x: cast(x, dtype if f in ("S", "ibar", "decay") else mx.int64))


def _index_state(state: DLAState, i: int) -> DLAState:
    return state.map(lambda f, x: x[i : i + 1])
