"""impl="triton": the Triton decision scan vs the PyTorch scan, the fused chunk forward vs the PyTorch chunk
math, and the whole op vs the reference.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py), so sizes stay small.
"""

import os

import numpy as np
import pytest
import torch

import dla_torch
from dla_torch.ops.attention import empty_state
from dla_torch.ops.chunk import _run_chunks, host_scan
from dla_torch.ops.triton.chunk import chunk_forward
from dla_torch.ops.triton.scan import triton_scan

from helpers import (
    NAMES,
    POLICIES,
    TRANSITIONS,
    assert_close,
    assert_states_close,
    compare,
    config_for,
    make_inputs,
    prefix_state,
    to_torch,
)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Fresh buffers hold NaN (floats) or a sentinel (integers), so an element the kernel skips shows."""
    empty = torch.empty

    def poisoned(*shape, dtype=None, **kw):
        out = empty(*shape, dtype=dtype, **kw)
        return out.fill_(float("nan") if out.is_floating_point() else -12345)

    monkeypatch.setattr(torch, "empty", poisoned)


def run_scans(config, x, active, state, chunk_size):
    args = (config, x["k"], x["v"], x["g"], x["beta"], active, state, chunk_size)
    return host_scan(*args), triton_scan(*args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_scan_kernel_equals_torch_scan(policy, delta, dtype, poisoned_outputs):
    """token_drift: in float32, state_drift's score loses digits to cancellation where the token is small
    against the state, so its ibar sums differ by more than 1e-6 between summation orders (state_drift:
    the test below, in float64)."""
    config = config_for(policy, score="token_drift")
    T = 45
    x = make_inputs(config, 2, T + 20, 1, 5, 3, delta=delta, seed=1)
    state, tail = prefix_state(config, x, 20)  # continue from a cache that already holds states
    tx = to_torch(tail, dtype)
    active = torch.ones(2, T, dtype=torch.bool)
    active[0, 10:14] = False
    active[1, :3] = False
    (sigma, book), (sigma2, book2) = run_scans(config, tx, active, to_torch(state, dtype), 16)
    assert sigma2.dtype == torch.int16 and (sigma2 >= -1).all()
    torch.testing.assert_close(sigma2, sigma, rtol=0, atol=0)
    for a, b in zip(book, book2):
        torch.testing.assert_close(b.to(a.dtype), a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T", [1, 63, 65], ids=lambda T: f"T{T}")
def test_scan_kernel_short_and_partial_chunks(T):
    """The default score, a threshold per head; the bookkeeping (n, ibar, pos, opened) too."""
    config = config_for("dla", threshold=(0.2, 0.6))
    x = to_torch(make_inputs(config, 1, T, 2, 3, 4, delta=True, seed=T))
    state = empty_state(1, 2, config.num_slots, 3, 4, torch.float64)
    (sigma, book), (sigma2, book2) = run_scans(config, x, torch.ones(1, T, dtype=torch.bool), state, 64)
    torch.testing.assert_close(sigma2, sigma, rtol=0, atol=0)
    for a, b in zip(book, book2):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", ["fenwick", "dla"])
def test_triton_equals_reference(policy, delta):
    config = config_for(policy)
    x = make_inputs(config, 1, 70, 2, 4, 3, delta=delta, seed=6)
    compare(config, x, impl="triton")


def test_triton_continues_from_a_state_with_padding():
    config = config_for("fixed")
    x = make_inputs(config, 2, 90, 1, 3, 5, delta=True, seed=8)
    state, tail = prefix_state(config, x, 25)
    mask = np.ones((2, 65), bool)
    mask[0, 40:] = False
    compare(config, tail, state=state, impl="triton", mask=torch.tensor(mask))


def test_triton_fenwick_too_long_names_capacity():
    config = dla_torch.DLAConfig(policy="fenwick", capacity=3)
    x = to_torch(make_inputs(config, 1, 5, 1, 2, 2, seed=0))
    with pytest.raises(ValueError, match="capacity=3 levels holds at most 4 tokens"):
        dla_torch.dla_attention(*(x[n] for n in NAMES), config=config, impl="triton")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    config = config_for("dla")
    x = to_torch(make_inputs(config, 1, 4, 1, 2, 2, seed=0))
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        dla_torch.dla_attention(*(x[n] for n in NAMES), config=config, impl="triton")
    assert "TRITON_INTERPRET" not in os.environ


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_fused_forward_equals_torch_chunk_math(policy, delta, poisoned_outputs):
    """The fused kernel vs the PyTorch chunk math on the same decisions, continuing from a cache that holds
    states: outputs and final states over two chunks of 16 and a partial one (odd Dk and Dv)."""
    config = config_for(policy)
    T, C = 37, 16
    x = make_inputs(config, 2, 20 + T, 2, 5, 7, delta=delta, seed=2)
    state, tail = prefix_state(config, x, 20)
    tx, st = to_torch(tail, torch.float32), to_torch(state, torch.float32)
    sigma, _ = host_scan(config, tx["k"], tx["v"], tx["g"], tx["beta"], torch.ones(2, T, dtype=torch.bool), st, C)
    args = (tx["q"], tx["k"], tx["v"], tx["g"], tx["lam"], tx["beta"], st.S)
    o, S = _run_chunks(*args, [(a, min(a + C, T)) for a in range(0, T, C)], sigma, 0.6)
    o2, S2 = chunk_forward(*args, sigma, 0.6, C)
    assert_close("o", o, o2, 1e-5)
    assert_close("S", S, S2, 1e-5)


@pytest.mark.parametrize("T", [1, 64, 65], ids=lambda T: f"T{T}")
def test_triton_forward_without_gradients_equals_reference(T):
    """Without gradients impl="triton" runs both kernels (scan, fused forward), with padding."""
    config = config_for("dla")
    x = to_torch(make_inputs(config, 2, T, 1, 3, 5, delta=True, seed=T), torch.float32)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, T // 2 :] = False
    run = lambda impl: dla_torch.dla_attention(*(x[n] for n in NAMES), config=config, mask=mask,
                                               output_final_state=True, impl=impl)
    (o, final), (o2, final2) = run("reference"), run("triton")
    assert_close("o", o, o2, 1e-5)
    assert_states_close(final, final2, 1e-5)


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_fused_backward_equals_reference_float32(policy, delta):
    """float32: the fused forward and backward kernels (three chunks, so three recomputed segments) vs the
    reference, from a cache that holds states, with padding: outputs, final states and every gradient (q, k,
    v, g, beta, lam and the initial states), at DESIGN's tolerances."""
    config = config_for(policy)
    x = make_inputs(config, 2, 20 + 150, 2, 5, 7, delta=delta, seed=4)
    state, tail = prefix_state(config, x, 20)
    mask = np.ones((2, 150), bool)
    mask[1, 100:] = False
    compare(config, tail, torch.float32, state=state, impl="triton", mask=torch.tensor(mask))


@pytest.mark.parametrize("delta", TRANSITIONS)
def test_fused_backward_matches_the_chunk_math_closely(delta):
    """The same gradients as autograd through the PyTorch chunk math, to float32 rounding (1e-5)."""
    config = config_for("dla")
    x = make_inputs(config, 1, 20 + 70, 2, 5, 7, delta=delta, seed=5)
    state, tail = prefix_state(config, x, 20)
    results = []
    for impl in ("chunk", "triton"):
        leaves = {n: None if tail[n] is None else to_torch(tail[n], torch.float32, requires_grad=True) for n in NAMES}
        st = to_torch(state, torch.float32)
        st.S.requires_grad_()
        o, final = dla_torch.dla_attention(*(leaves[n] for n in NAMES), config=config, initial_state=st,
                                           output_final_state=True, impl=impl)
        weights = torch.randn(o.shape, generator=torch.Generator().manual_seed(0))
        ((o * weights).sum() + final.S.square().sum()).backward()
        results.append([o, final.S, st.S.grad] + [leaves[n].grad for n in NAMES if leaves[n] is not None])
    names = ["o", "S", "dS0"] + [f"d{n}" for n in NAMES if tail[n] is not None]
    assert len(names) == len(results[0])
    for name, a, b in zip(names, *results):
        assert_close(name, a, b, 1e-5)
