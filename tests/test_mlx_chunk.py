"""dla_mlx impl="chunk" vs the oracle (outputs, states) and vs the MLX reference (every gradient)."""

import mlx.core as mx
import numpy as np
import pytest

import dla_mlx
import dla_shared
from helpers import NAMES, POLICIES, assert_close, assert_states_close, config_for, make_inputs, to_mlx
from test_chunk import prefix_state

TRANSITIONS = [pytest.param(False, id="diagonal"), pytest.param(True, id="delta")]


def run(impl, config, x, state=None, **kw):
    return dla_mlx.dla_attention(*(to_mlx(x[n], mx.float32) for n in NAMES), config=config, impl=impl,
                                 initial_state=None if state is None else to_mlx(state, mx.float32),
                                 output_final_state=True, **kw)


def compare_outputs(config, x, state=None, **kw):
    expected, final = dla_shared.dla_attention(*(x[n] for n in NAMES), config=config, initial_state=state,
                                               output_final_state=True, **{k: np.array(v) for k, v in kw.items()})
    o, final2 = run("chunk", config, x, state, **kw)
    assert_close("o", expected, o, 1e-5)
    assert_states_close(final, final2, 1e-5)


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200], ids=lambda T: f"T{T}")
@pytest.mark.parametrize("policy", POLICIES)
def test_mlx_chunk_equals_oracle(policy, T, delta):
    config = config_for(policy)
    x = make_inputs(config, 2, T, 2, 5, 3, delta=delta, seed=T + 1)
    compare_outputs(config, x)


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_mlx_chunk_continues_packs_and_pads(policy, delta):
    config = config_for(policy)
    x = make_inputs(config, 2, 170, 2, 4, 6, delta=delta, seed=3)
    state, tail = prefix_state(config, x, 37)
    compare_outputs(config, tail, state)
    packed = make_inputs(config, 1, 150, 2, 4, 3, delta=delta, seed=4)
    compare_outputs(config, packed, cu_seqlens=mx.array([0, 3, 70, 70, 150]))
    mask = np.ones((2, 133), bool)
    mask[0, :66] = False
    mask[1, 5::7] = False
    padded = make_inputs(config, 2, 133, 2, 4, 3, delta=delta, seed=5)
    for n in NAMES:
        if padded[n] is not None:
            padded[n][~mask] = np.nan
    compare_outputs(config, padded, mask=mx.array(mask))


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_mlx_chunk_gradients_equal_reference(policy, delta):
    config = config_for(policy)
    x = make_inputs(config, 1, 90, 2, 4, 3, delta=delta, seed=9)
    state, tail = prefix_state(config, x, 20)
    names = [n for n in NAMES if x[n] is not None]
    weight = mx.array(np.random.default_rng(0).standard_normal((1, 70, 2, 3)), dtype=mx.float32)

    def loss(impl):
        def f(*arrays):
            inputs = dict(zip(names, arrays[:-1]))
            s = to_mlx(state, mx.float32)
            s.S = arrays[-1]
            o, final = dla_mlx.dla_attention(*(inputs.get(n) for n in NAMES), config=config, impl=impl,
                                             initial_state=s, output_final_state=True)
            return (o * weight).sum() + final.S.sum()
        return f

    arrays = [to_mlx(tail[n], mx.float32) for n in names] + [to_mlx(state.S, mx.float32)]
    argnums = list(range(len(arrays)))
    expected = mx.grad(loss("reference"), argnums=argnums)(*arrays)
    got = mx.grad(loss("chunk"), argnums=argnums)(*arrays)
    for name, a, b in zip(names + ["S0"], expected, got):
        assert_close(f"d{name}", np.array(a), np.array(b), 1e-4)
