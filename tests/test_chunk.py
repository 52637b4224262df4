"""impl="chunk" vs the exact reference (DESIGN section 5): outputs, final states and every gradient."""

import numpy as np
import pytest
import torch

import dla_shared
import dla_torch

from helpers import NAMES, POLICIES, assert_close, assert_states_close, config_for, make_inputs, to_numpy, to_torch

TRANSITIONS = [pytest.param(False, id="diagonal"), pytest.param(True, id="delta")]
LENGTHS = [pytest.param(T, id=f"T{T}") for T in (1, 63, 64, 65, 200)]
TOL32 = {"o": 4e-3, "grad": 1e-2}  # relative RMS, float32 (DESIGN section 5)


def run(impl, config, x, dtype, state=None, **kw):
    """Forward and backward of a fixed random loss on outputs and final states; all results as numpy."""
    tx = to_torch(x, dtype, requires_grad=True)
    ts = None if state is None else to_torch(state, dtype, requires_grad=True)
    o, final = dla_torch.dla_attention(*(tx[n] for n in NAMES), config=config, impl=impl, initial_state=ts,
                                       output_final_state=True, **kw)
    rng = torch.Generator().manual_seed(0)
    loss = (o * torch.randn(o.shape, generator=rng, dtype=dtype)).sum() + \
        (final.S * torch.randn(final.S.shape, generator=rng, dtype=dtype)).sum()
    loss.backward()
    grads = {f"d{n}": tx[n].grad for n in NAMES if tx[n] is not None}
    if ts is not None:
        grads["dS0"] = ts.S.grad
    return to_numpy(o), to_numpy(final), {n: to_numpy(v) for n, v in grads.items()}


def prefix_state(config, x, t):
    """The oracle's state after the first t tokens, and the remaining inputs."""
    head = {n: None if x[n] is None else x[n][:, :t] for n in NAMES}
    tail = {n: None if x[n] is None else x[n][:, t:] for n in NAMES}
    return dla_shared.dla_attention(*(head[n] for n in NAMES), config=config, output_final_state=True)[1], tail


def compare(config, x, dtype=torch.float64, state=None, impl="chunk", **kw):
    """``impl`` vs the reference: outputs, final states and every gradient."""
    o, final, grads = run("reference", config, x, dtype, state, **kw)
    o2, final2, grads2 = run(impl, config, x, dtype, state, **kw)
    if dtype == torch.float64:
        tol = {"o": 1e-10, "grad": 1e-9}
    else:
        tol = TOL32
    assert_close("o", o, o2, tol["o"])
    assert_states_close(final, final2, tol["o"])
    assert grads.keys() == grads2.keys()
    for name in grads:
        assert_close(name, grads[name], grads2[name], tol["grad"])


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("policy", POLICIES)
def test_chunk_equals_reference_float64(policy, T, delta):
    config = config_for(policy)
    x = make_inputs(config, 2, T, 2, 5, 3, delta=delta, seed=T)
    compare(config, x)


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_chunk_equals_reference_float32(policy, delta):
    config = config_for(policy)
    x = make_inputs(config, 2, 150, 2, 16, 8, delta=delta, seed=7)
    if policy == "dla":  # hard decisions: no float32 score may sit on the threshold
        trace = dla_shared.inspect(*(x[n] for n in ("q", "k", "v", "g")), x["beta"], config=config)
        assert np.nanmin(np.abs(trace.score - config.threshold)) > 1e-5
    compare(config, x, torch.float32)


@pytest.mark.parametrize("delta", TRANSITIONS)
def test_chunk_long_sequence_at_paper_capacity(delta):
    config = dla_shared.DLAConfig(policy="dla", capacity=30)
    x = make_inputs(config, 1, 1000, 2, 7, 5, delta=delta, seed=1, switch=0.05)
    compare(config, x)


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_chunk_continues_from_a_state(policy, delta):
    """Gradients reach the initial states too."""
    config = config_for(policy)
    x = make_inputs(config, 2, 170, 2, 4, 6, delta=delta, seed=3)
    state, tail = prefix_state(config, x, 37)
    compare(config, tail, state=state)


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_chunk_cu_seqlens_and_padding(policy, delta):
    config = config_for(policy)
    cu = torch.tensor([0, 3, 70, 70, 150, 213])  # uneven, an empty one, boundaries inside chunks
    x = make_inputs(config, 1, 213, 2, 5, 3, delta=delta, seed=11)
    compare(config, x, cu_seqlens=cu)
    x = make_inputs(config, 3, 140, 2, 5, 3, delta=delta, seed=12)
    mask = np.ones((3, 140), bool)
    mask[0, :70] = False
    mask[1, 100:] = False
    mask[2, 5::7] = False
    for n in NAMES:  # padding may hold anything, NaN included
        if x[n] is not None:
            x[n][~mask] = np.nan
    compare(config, x, mask=torch.tensor(mask))


def test_chunk_is_the_default_and_runs_without_gradients():
    config = config_for("dla")
    x = make_inputs(config, 1, 100, 2, 4, 4, seed=5)
    with torch.no_grad():
        o, _ = dla_torch.dla_attention(*(to_torch(x[n]) for n in NAMES), config=config)
    expected, _ = dla_shared.dla_attention(*(x[n] for n in NAMES), config=config)
    assert_close("o", expected, o, 1e-10)
