"""The numpy oracle vs the torch and MLX references, every policy, both transitions (DESIGN section 5)."""

import mlx.core as mx
import numpy as np
import pytest
import torch

import dla_mlx
import dla_shared
import dla_torch

from helpers import (
    NAMES,
    POLICIES,
    TRANSITIONS,
    assert_close,
    assert_states_close,
    config_for,
    make_inputs,
    to_mlx,
    to_numpy,
    to_torch,
)

SHAPES = [  # (B, T, H, Dk, Dv)
    pytest.param((1, 1, 1, 4, 4), id="T1"),
    pytest.param((2, 7, 3, 5, 3), id="T7-odd-dims"),
    pytest.param((3, 63, 2, 7, 9), id="T63-B3"),
    pytest.param((2, 200, 2, 3, 5), id="T200"),
]
# mlx's exp is float32-accurate even on float64 arrays (measured: 2.6e-8 abs), so MLX "float64"
# can only be held to about 1e-7; torch float64 to DESIGN's 1e-10.
FLOAT64_TOL = {"torch": 1e-10, "mlx": 1e-7}


def run_oracle(config, x, **kw):
    return dla_shared.dla_attention(*(x[n] for n in NAMES), config=config, output_final_state=True, **kw)


def run_torch(config, x, dtype=torch.float64, **kw):
    return dla_torch.dla_attention(*(to_torch(x[n], dtype) for n in NAMES), config=config, impl="reference",
                                   output_final_state=True, **kw)


def run_mlx(config, x, dtype=mx.float64, **kw):
    return dla_mlx.dla_attention(*(to_mlx(x[n], dtype) for n in NAMES), config=config, impl="reference",
                                 output_final_state=True, **kw)


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("policy", POLICIES)
def test_float64_references_equal_oracle(policy, shape, delta):
    B, T, H, Dk, Dv = shape
    config = config_for(policy)
    x = make_inputs(config, B, T, H, Dk, Dv, delta=delta, seed=T + B)
    o, state = run_oracle(config, x)
    for name, (o2, state2) in {"torch": run_torch(config, x), "mlx": run_mlx(config, x)}.items():
        assert to_numpy(o2).dtype == np.float64, name
        assert_close(f"{name} o", o, o2, FLOAT64_TOL[name])
        assert_states_close(state, state2, FLOAT64_TOL[name])


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_float32_references_equal_oracle(policy, delta):
    config = config_for(policy)
    x = make_inputs(config, 2, 63, 3, 8, 6, delta=delta, seed=3)
    if policy == "dla":  # hard decisions: no float32 score may sit on the threshold
        trace = dla_shared.inspect(*(x[n] for n in ("q", "k", "v", "g")), x["beta"], config=config)
        assert np.nanmin(np.abs(trace.score - config.threshold)) > 1e-5
    o, state = run_oracle(config, x)
    for name, (o2, state2) in {"torch": run_torch(config, x, torch.float32),
                               "mlx": run_mlx(config, x, mx.float32)}.items():
        assert to_numpy(o2).dtype == np.float32, name
        assert_close(f"{name} o", o, o2, 1e-5)
        assert_states_close(state, state2, 1e-5)


@pytest.mark.parametrize("policy", POLICIES)
def test_boundaries_differ_per_row_and_head(policy):
    """The inputs the comparisons use really exercise per-(row, head) decisions."""
    config = config_for(policy)
    x = make_inputs(config, 3, 63, 2, 7, 9, seed=66)
    trace = dla_shared.inspect(*(x[n] for n in ("q", "k", "v", "g")), config=config)
    if policy == "dla":
        rows = {tuple(trace.boundaries(b, h)) for b in range(3) for h in range(2)}
        assert len(rows) == 6
        assert (trace.merge_slot >= 0).any(), "no merge happened"
    if policy == "fixed":
        assert (trace.merge_slot >= 0).any()


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_padding_mask(policy, delta):
    config = config_for(policy)
    x = make_inputs(config, 3, 40, 2, 4, 5, delta=delta, seed=9)
    mask = np.ones((3, 40), bool)
    mask[0, :7] = False  # left padding
    mask[1, 31:] = False  # right padding
    mask[2, ::3] = False  # holes
    for name in NAMES:  # padding may hold anything
        if x[name] is not None:
            x[name][~mask] = np.nan
    o, state = run_oracle(config, x, mask=mask)
    assert (o[~mask] == 0).all()
    np.testing.assert_array_equal(state.pos, mask.sum(1))
    for name, (o2, state2) in {"torch": run_torch(config, x, mask=torch.tensor(mask)),
                               "mlx": run_mlx(config, x, mask=mx.array(mask))}.items():
        assert_close(f"{name} o", o, o2, FLOAT64_TOL[name])
        assert_states_close(state, state2, FLOAT64_TOL[name])
    # Each row alone, without its padding, gives the same outputs and state.
    for b in range(3):
        row = {n: None if x[n] is None else x[n][b : b + 1, mask[b]] for n in NAMES}
        o_row, state_row = run_oracle(config, row)
        np.testing.assert_allclose(o[b, mask[b]], o_row[0], atol=1e-12)
        np.testing.assert_allclose(state.S[b], state_row.S[0], atol=1e-12)


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_cu_seqlens_equal_sequences_one_by_one(policy, delta):
    config = config_for(policy)
    cu = [0, 5, 5, 22, 41]  # an empty sequence too
    x = make_inputs(config, 1, cu[-1], 2, 4, 3, delta=delta, seed=5)
    o, state = run_oracle(config, x, cu_seqlens=np.array(cu))
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        part = {n: None if x[n] is None else x[n][:, s:e] for n in NAMES}
        o_i, state_i = run_oracle(config, part)
        np.testing.assert_allclose(o[:, s:e], o_i, atol=1e-12)
        np.testing.assert_allclose(state.S[i], state_i.S[0], atol=1e-12)
        np.testing.assert_array_equal(state.n[i], state_i.n[0])
    for name, (o2, state2) in {"torch": run_torch(config, x, cu_seqlens=torch.tensor(cu)),
                               "mlx": run_mlx(config, x, cu_seqlens=mx.array(cu))}.items():
        assert_close(f"{name} o", o, o2, FLOAT64_TOL[name])
        assert_states_close(state, state2, FLOAT64_TOL[name])


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_torch_gradients_match_mlx(policy, delta):
    """Both references are differentiable in every input and the initial state, and agree (float64)."""
    config = config_for(policy)
    x = make_inputs(config, 2, 23, 2, 4, 3, delta=delta, seed=13)
    head = {n: None if x[n] is None else x[n][:, :9] for n in NAMES}
    tail = {n: None if x[n] is None else x[n][:, 9:] for n in NAMES}
    _, state0 = run_oracle(config, head)
    weight = np.random.default_rng(0).standard_normal((2, 14, 2, 3))
    names = [n for n in NAMES if x[n] is not None]

    tx = to_torch(tail, requires_grad=True)
    tstate = to_torch(state0, requires_grad=True)
    o, _ = dla_torch.dla_attention(*(tx[n] for n in NAMES), config=config, initial_state=tstate)
    (o * torch.tensor(weight)).sum().backward()
    torch_grads = {n: tx[n].grad.numpy() for n in names} | {"S0": tstate.S.grad.numpy()}

    def loss(*arrays):
        inputs = dict(zip(names, arrays[:-1]))
        s = to_mlx(state0)
        s.S = arrays[-1]
        o, _ = dla_mlx.dla_attention(*(inputs.get(n) for n in NAMES), config=config, initial_state=s)
        return (o * mx.array(weight, dtype=mx.float64)).sum()

    arrays = [to_mlx(tail[n]) for n in names] + [to_mlx(state0.S)]
    mlx_grads = mx.grad(loss, argnums=list(range(len(arrays))))(*arrays)
    for name, grad in zip(names + ["S0"], mlx_grads):
        assert np.abs(torch_grads[name]).max() > 0, f"no gradient reaches {name}"
        assert_close(f"d{name}", torch_grads[name], grad, FLOAT64_TOL["mlx"])


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_torch_gradients_match_finite_differences(policy, delta):
    config = config_for(policy)
    x = to_torch(make_inputs(config, 1, 12, 1, 3, 2, delta=delta, seed=4), requires_grad=True)
    inputs = tuple(x[n] for n in NAMES if x[n] is not None)

    def f(*args):
        it = iter(args)
        return dla_torch.dla_attention(*(next(it) if x[n] is not None else None for n in NAMES), config=config)[0]

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)
