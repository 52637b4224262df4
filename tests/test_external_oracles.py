"""Oracles nobody here wrote (DESIGN section 5): fla's naive log-linear attention for `fenwick`,
mlx's and mlx-lm's gated delta rule for `single` with the delta rule."""

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm.models.gated_delta import gated_delta_update

import dla_mlx
import dla_shared
import dla_torch
from dla_torch.ops.fla_naive import load

from helpers import NAMES, assert_close, config_for, make_inputs, to_mlx, to_torch

fla_naive = load("log_linear_attn")
naive_log_linear_attn = fla_naive.naive_log_linear_attn


@pytest.mark.parametrize("T", [1, 8, 37, 100], ids=lambda T: f"T{T}")
def test_fenwick_slots_are_fla_log_linear_levels(T):
    """The fenwick policy's slot_t(s) is fla's level of s seen from t (its M^H mask)."""
    config = config_for("fenwick")
    x = make_inputs(config, 1, T, 1, 3, 3, seed=T)
    slots = dla_shared.inspect(*(x[n] for n in ("q", "k", "v", "g")), config=config).slot_map()
    levels = math.ceil(math.log2(max(T, 2))) + 1
    ones = torch.ones(levels, T, dtype=torch.float64)
    expected = sum(level * fla_naive.construct_level_mask(level, ones).numpy() for level in range(levels))
    causal = np.tril(np.ones((T, T), bool))
    np.testing.assert_array_equal(slots[causal], expected[causal])
    assert (slots[~causal] == -1).all()


@pytest.mark.parametrize("T", [1, 7, 37, 64, 130], ids=lambda T: f"T{T}")
def test_fenwick_equals_fla_log_linear(T):
    config = config_for("fenwick")
    x = make_inputs(config, 2, T, 3, 6, 5, seed=T)
    levels = math.ceil(math.log2(max(T, 2))) + 1  # what fla's naive form reads
    args64 = [torch.tensor(x[n]) for n in ("q", "k", "v", "g")] + [torch.tensor(x["lam"][..., :levels])]
    expected = naive_log_linear_attn(*args64).numpy()
    inputs = [x[n] for n in NAMES]
    assert_close("oracle", expected, dla_shared.dla_attention(*inputs, config=config)[0], 1e-10)
    assert_close("torch float64", expected, dla_torch.dla_attention(*to_torch(inputs), config=config)[0], 1e-10)
    # float32 against fla in float32
    expected32 = naive_log_linear_attn(*(a.float() for a in args64)).numpy()
    o32 = dla_torch.dla_attention(*to_torch(inputs, torch.float32), config=config)[0]
    assert_close("torch float32", expected32, o32, 1e-5)
    o32 = dla_mlx.dla_attention(*to_mlx(inputs, mx.float32), config=config)[0]
    assert_close("mlx float32", expected32, o32, 1e-5)


def _delta_inputs(B=2, T=33, H=3, Dk=16, Dv=8, seed=0):
    rng = np.random.default_rng(seed)
    x = make_inputs(config_for("single"), B, T, H, Dk, Dv, delta=True, seed=seed)
    x["lam"] = None
    raw = {"a": rng.standard_normal((B, T, H)), "b": rng.standard_normal((B, T, H)),
           "A_log": rng.standard_normal(H) * 0.5, "dt_bias": rng.standard_normal(H) * 0.5}
    # mlx-lm's parameterization: g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b)
    x["g"] = -np.exp(raw["A_log"]) * np.logaddexp(0, raw["a"] + raw["dt_bias"])
    x["beta"] = 1 / (1 + np.exp(-raw["b"]))
    x["S0"] = rng.standard_normal((B, H, Dk, Dv)) * 0.3
    return x, raw


def _single_state(x, backend):
    """The delta-rule single-state DLA from the initial state S0; o and final S [B, H, Dk, Dv]."""
    B, _, H, Dk = x["q"].shape
    S0 = x["S0"][:, :, None]
    state = dla_shared.DLAState(S0, np.ones((B, H, 1), np.int64), np.zeros((B, H, 1)), np.ones(B, np.int64),
                                np.zeros((B, H), np.int64))
    inputs = [x[n] for n in NAMES]
    if backend == "torch":
        o, final = dla_torch.dla_attention(*to_torch(inputs, torch.float32), config=config_for("single"),
                                           initial_state=to_torch(state, torch.float32), output_final_state=True)
    else:
        o, final = dla_mlx.dla_attention(*to_mlx(inputs, mx.float32), config=config_for("single"),
                                         initial_state=to_mlx(state, mx.float32), output_final_state=True)
    return np.asarray(o), np.asarray(final.S)[:, :, 0]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_single_delta_rule_equals_mx_fast_gated_delta_update(backend):
    x, _ = _delta_inputs()
    f32 = lambda a: mx.array(a, dtype=mx.float32)
    y, state = mx.fast.gated_delta_update(f32(x["q"]), f32(x["k"]), f32(x["v"]), f32(np.exp(x["g"])), f32(x["beta"]),
                                          initial_state=f32(x["S0"].transpose(0, 1, 3, 2)))
    o, S = _single_state(x, backend)
    assert_close("o", np.array(y), o, 1e-5)
    assert_close("state", np.array(state).transpose(0, 1, 3, 2), S, 1e-5)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_single_delta_rule_equals_mlx_lm_gated_delta_update(backend):
    x, raw = _delta_inputs(seed=1)
    f32 = lambda a: mx.array(a, dtype=mx.float32)
    y, state = gated_delta_update(f32(x["q"]), f32(x["k"]), f32(x["v"]), f32(raw["a"]), f32(raw["b"]),
                                  f32(raw["A_log"]), f32(raw["dt_bias"]), state=f32(x["S0"].transpose(0, 1, 3, 2)),
                                  use_kernel=False)
    o, S = _single_state(x, backend)
    assert_close("o", np.array(y), o, 1e-5)
    assert_close("state", np.array(state).transpose(0, 1, 3, 2), S, 1e-5)


@pytest.mark.parametrize("delta", [False, True], ids=["diagonal", "delta"])
@pytest.mark.parametrize("policy", ["fenwick", "fixed", "dla"])
def test_unit_read_weights_equal_single(policy, delta):
    """The invariant: with all read weights 1 every policy is the single-state base model."""
    config = config_for(policy)
    x = make_inputs(config, 2, 70, 2, 5, 4, delta=delta, seed=8)
    x["lam"] = np.ones_like(x["lam"])
    base = dict(x, lam=None)
    o, state = dla_shared.dla_attention(*(x[n] for n in NAMES), config=config, output_final_state=True)
    o_single, state_single = dla_shared.dla_attention(*(base[n] for n in NAMES), config=config_for("single"),
                                                      output_final_state=True)
    assert_close("o", o_single, o, 1e-12)
    assert_close("sum of states", state_single.S[:, :, 0], state.S.sum(2), 1e-12)
    o_torch = dla_torch.dla_attention(*(to_torch(x[n], torch.float32) for n in NAMES), config=config)[0]
    assert_close("torch float32", o_single, o_torch, 1e-5)
