"""`dla_attention` for PyTorch: argument checks, dtypes, packed sequences, and the choice of impl."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from dla_shared import DLAConfig, DLAState, decode
from dla_shared.state import canonical, check_inputs

from .chunk import dla_chunk, needs_grad
from .reference import dla_reference
from .step import dla_cpu, dla_step
from .triton import dla_triton

IMPLS = {"reference": dla_reference, "step": dla_step, "cpu": dla_cpu, "chunk": dla_chunk, "triton": dla_triton}


def dla_attention(q, k, v, g, lam=None, beta=None, *, config: DLAConfig, scale: float = 1.0, mask=None,
                  initial_state: DLAState | None = None, output_final_state: bool = False, cu_seqlens=None,
                  impl: str = "auto", check_decay: bool = True, donate_state: bool = False):
    """Dynamic Linear Attention (DESIGN section 2).

    Args:
        q, k: [B, T, H, Dk]. v: [B, T, H, Dv].
        g: [B, T, H] log decay (<= 0); every state is multiplied by exp(g_t).
        lam: [B, T, H, L] read weights, L = config.num_slots (slot 0 = newest state); None = ones.
        beta: [B, T, H] in (0, 1) for the gated delta rule; None for the diagonal transition.
        config: the cache policy (a per-head threshold has H values). scale: output scale.
        mask: [B, T] bool, False = padding (changes nothing, output zero).
        initial_state: a DLAState to continue from (batch N). output_final_state: return the final one.
        cu_seqlens: [N + 1] int offsets of N sequences packed in one row (B == 1).
        check_decay: refuse g > 0, which reads g on the host (a sync per call); the models, whose g is
            <= 0 by construction, pass False so that decoding never waits on the host.
        impl: "reference" (token by token), "step" (token by token with the decisions on the device: the
            decode path), "cpu" (the step compiled in C, for CPU tensors without gradients), "chunk"
            (chunkwise, pure PyTorch), "triton" (the chunk path with Triton kernels: the decision scan, and for
            float32 the fused chunk forward and backward) or "auto" (for one token, cpu where it applies and
            was built, else step; for more, triton on CUDA and chunk elsewhere).
        donate_state: the caller gives up ``initial_state``: impl="cpu" may write the final state into its
            tensors (when they are C-contiguous and of the compute dtype), saving a copy of the K states per
            call; the models' caches, which own their states, do. ``initial_state`` must not be used after.

    Returns:
        o [B, T, H, Dv] in q's dtype, and the final DLAState (float32 states, float64 for float64
        inputs; the bookkeeping on the states' device after "step", on the CPU otherwise) or None. After
        "cpu" (what "auto" takes to decode on the CPU) the state is in the physical layout (``slot``, ``decay``:
        `dla_shared.state`); ``canonical(state, torch.take_along_dim)`` gives slot i at index i.
    """
    # mask and cu_seqlens may come as lists or numpy arrays, as the numpy oracle takes them
    mask, cu_seqlens = (x if x is None or isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
                        for x in (mask, cu_seqlens))
    B, T, H, Dk, Dv, L, N = check_inputs(config, q, k, v, g, lam, beta, mask, initial_state, cu_seqlens,
                                         is_float=torch.is_floating_point, scale=scale, array_type=torch.Tensor,
                                         check_decay=check_decay)
    if impl == "auto":
        if T == 1:
            grads = needs_grad(q, k, v, g, lam, beta, None if initial_state is None else initial_state.S)
            impl = "cpu" if q.device.type == "cpu" and decode.available() and not grads else "step"
        else:
            impl = "triton" if q.is_cuda else "chunk"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {['auto', *IMPLS]}, got {impl!r}")
    out_dtype = q.dtype
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    cast = lambda x: None if x is None else x.to(dtype)
    q, k, v, g, beta = map(cast, (q, k, v, g, beta))
    lam = q.new_ones(B, T, H, L) if lam is None else cast(lam)
    if mask is not None:  # padding may hold anything; zeros keep NaN out of outputs and gradients
        keep = lambda x: None if x is None else torch.where(mask.to(x.device).view(B, T, *[1] * (x.dim() - 2)), x, 0)
        q, k, v, g, lam, beta = map(keep, (q, k, v, g, lam, beta))
    books = q.device if impl == "step" else torch.device("cpu")  # where the bookkeeping is read
    state = (empty_state(N, H, L, Dk, Dv, dtype, q.device, books) if initial_state is None
             else _cast_state(initial_state, dtype, books, layout=impl == "cpu"))

    donate = {"donate": donate_state} if impl == "cpu" else {}
    run = lambda state, *x: IMPLS[impl](*x, state, config=config, scale=scale, **donate)
    inputs = (q, k, v, g, lam, beta, mask)
    if cu_seqlens is None:  # no sequences (B = 0): nothing to run, and the chunk paths reduce over rows
        o, state = run(state, *inputs) if B else (q.new_zeros(B, T, H, Dv), state)
    else:
        bounds = cu_seqlens.tolist()
        starts, lengths = torch.tensor(bounds[:-1]), torch.tensor(bounds[1:]) - torch.tensor(bounds[:-1])
        longest = int(lengths.max())
        if N * longest <= 2 * T:  # similar lengths: one padded batch [N, longest], padding masked
            valid = torch.arange(longest) < lengths[:, None]
            where = torch.where(valid, starts[:, None] + torch.arange(longest), 0).to(q.device)
            valid = valid.to(q.device)
            pad = lambda x: None if x is None else torch.where(valid.view(N, longest, *[1] * (x.dim() - 2)),
                                                               x[0, where], 0)
            o, state = run(state, *map(pad, inputs[:-1]), valid)
            o = o[valid][None]
        else:  # one sequence at a time
            parts = [run(_index_state(state, i), *(None if x is None else x[:, s:e] for x in inputs))
                     for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))]
            o = torch.cat([part[0] for part in parts], dim=1)
            state = DLAState(**{f: torch.cat([getattr(part[1], f) for part in parts]) for f in parts[0][1].fields()})
    return o.to(out_dtype), (dataclasses.replace(state, config=config) if output_final_state else None)


def empty_state(N, H, L, Dk, Dv, dtype=torch.float32, device=None, books="cpu") -> DLAState:
    """A DLAState with no tokens: N sequences, H heads, L slots (the states on ``device``, the bookkeeping
    on ``books``)."""
    return DLAState(torch.zeros(N, H, L, Dk, Dv, dtype=dtype, device=device),
                    torch.zeros(N, H, L, dtype=torch.int64, device=books),
                    torch.zeros(N, H, L, dtype=dtype, device=books),
                    torch.zeros(N, dtype=torch.int64, device=books), torch.zeros(N, H, dtype=torch.int64, device=books))


def _cast_state(state: DLAState, dtype, books, layout: bool) -> DLAState:
    """States in ``dtype`` where they are, in the layout they came in if ``layout`` (for impl='cpu'), else in
    the canonical one; the bookkeeping on ``books`` (int64; ibar and decay in ``dtype``)."""
    if not layout and state.slot is not None:
        state = canonical(state.map(lambda f, x: x.to(state.S.device)), torch.take_along_dim)
    return state.map(lambda f, x: x.to(dtype) if f == "S" else x.to(books, dtype if f in ("ibar", "decay") else
                                                                       torch.int64))


def _index_state(state: DLAState, i: int) -> DLAState:
    return state.map(lambda f, x: x[i : i + 1])
