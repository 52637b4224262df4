"""Per-head thresholds (DESIGN section 2) in the torch ops: the reference, chunk and Triton paths vs the oracle,
with heads that open states at clearly different rates, and the boundary counts of `DLAState.opened`.

Triton runs in its interpreter without CUDA (tests/conftest.py), in float32 so that its fused kernels run,
on short sequences (its chunk boundaries are test_triton's subject).
"""

from typing import NamedTuple

import numpy as np
import pytest
import torch

import dla_shared
import dla_torch
from dla_shared import DLAConfig

from helpers import NAMES, TRANSITIONS, assert_close, assert_states_close, make_inputs, run_with_grads, to_torch

# One threshold per head, per transition (the delta rule's scores run higher): about 80-100%, 20-60% and 1-10%
# of the tokens open a state.
THRESHOLDS = {False: (0.15, 0.3, 0.6), True: (0.15, 0.45, 1.0)}
CONFIGS = {delta: DLAConfig(policy="dla", capacity=4, threshold=t) for delta, t in THRESHOLDS.items()}


class Impl(NamedTuple):
    dtype: torch.dtype
    tol: float  # outputs and states vs the oracle (DESIGN section 5)
    grad_tol: float | None  # gradients vs the reference's
    T: int  # the length of the inputs (70: two chunks of 64)


IMPLS = {
    "reference": Impl(torch.float64, 1e-10, None, 70),
    "chunk": Impl(torch.float64, 1e-10, 1e-9, 70),
    "triton": Impl(torch.float32, 4e-3, 1e-2, 20),
}


def padded(delta, T):
    """Two rows, H = 3: left padding and holes, right padding (NaN in the padding)."""
    x = make_inputs(CONFIGS[delta], 2, T, 3, 5, 7, delta=delta, seed=3)
    mask = np.ones((2, T), bool)
    mask[0, :5] = False
    mask[0, 8::5] = False
    mask[1, T * 2 // 3 :] = False
    for n in NAMES:
        if x[n] is not None:
            x[n][~mask] = np.nan
    return x, {"mask": mask}


def packed(delta, T):
    """Four sequences in one row: one token, T - 1 tokens, none, T + 10 tokens."""
    x = make_inputs(CONFIGS[delta], 1, 2 * T + 10, 3, 5, 7, delta=delta, seed=4)
    return x, {"cu_seqlens": np.array([0, 1, T, T, 2 * T + 10])}


LAYOUTS = {"padding": padded, "cu_seqlens": packed}


def oracle(config, x, **kw):
    """The oracle's outputs and final state, after checking what the tests rely on: the heads open states at
    clearly different rates, the final ``opened`` counts the boundaries (tokens after their sequence's first
    that opened a state), and no score sits within float32 rounding of its head's threshold."""
    args = [x[n] for n in NAMES]
    o, state = dla_shared.dla_attention(*args, config=config, output_final_state=True, **kw)
    trace = dla_shared.inspect(*args[:4], x["beta"], config=config, **kw)
    later = trace.pos > 0  # [B, T]
    boundaries = trace.opened & later[..., None]  # [B, T, H]
    rate = boundaries.sum((0, 1)) / later.sum()
    assert (np.diff(rate) < -0.15).all(), f"open rates per head: {rate}"
    assert np.nanmin(np.abs(trace.score - np.array(config.threshold))) > 1e-5
    B, T = later.shape
    cu = kw.get("cu_seqlens")
    spans = [(b, 0, T) for b in range(B)] if cu is None else [(0, s, e) for s, e in zip(cu[:-1], cu[1:])]
    np.testing.assert_array_equal(state.opened, [boundaries[b, s:e].sum(0) for b, s, e in spans])
    return o, state


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_per_head_thresholds_equal_oracle(impl, delta, layout):
    """Outputs and final states (opened counts exactly) vs the oracle; every gradient vs the reference's."""
    config, (dtype, tol, grad_tol, T) = CONFIGS[delta], IMPLS[impl]
    x, kw = LAYOUTS[layout](delta, T)
    o, state = oracle(config, x, **kw)
    kw = {name: torch.tensor(value) for name, value in kw.items()}
    o2, state2, grads2 = run_with_grads(impl, config, x, dtype, **kw)
    assert_close("o", o, o2, tol)
    assert_states_close(state, state2, tol)
    if grad_tol is not None:
        grads = run_with_grads("reference", config, x, dtype, **kw)[2]
        assert grads.keys() == grads2.keys()
        for name in grads:
            assert_close(name, grads[name], grads2[name], grad_tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_opened_continues_across_a_split(impl):
    """A padded batch run in pieces, each from the state the last left, counts the same boundaries as one
    pass; row 0's third piece starts right after its first real token, whose successor counts."""
    config, (dtype, tol, _, T) = CONFIGS[True], IMPLS[impl]
    x, kw = padded(True, T)
    mask = kw["mask"]
    _, whole = oracle(config, x, mask=mask)
    state, bounds = None, [0, 1, 6, T]
    for s, e in zip(bounds[:-1], bounds[1:]):
        piece = [None if x[n] is None else to_torch(x[n][:, s:e], dtype) for n in NAMES]
        _, state = dla_torch.dla_attention(*piece, config=config, mask=torch.tensor(mask[:, s:e]), impl=impl,
                                           initial_state=state, output_final_state=True)
    assert_states_close(whole, state, tol)
