"""dla_mlx impl="chunk" vs the oracle (outputs, states, open counts) and vs the MLX reference (every gradient);
per-head thresholds in the MLX reference and chunk paths against the oracle."""

import mlx.core as mx
import numpy as np
import pytest

import dla_mlx
import dla_shared

from helpers import (
    NAMES,
    POLICIES,
    TRANSITIONS,
    assert_close,
    assert_rates_differ,
    assert_states_close,
    config_for,
    head_thresholds,
    make_inputs,
    prefix_state,
    to_mlx,
)

IMPLS = ["reference", "chunk"]


def config_of(policy, H, delta):
    """`config_for`'s small caches; dla with a threshold per head (`head_thresholds`)."""
    return config_for(policy, threshold=head_thresholds(H, delta)) if policy == "dla" else config_for(policy)


def run(impl, config, x, state=None, **kw):
    return dla_mlx.dla_attention(*(to_mlx(x[n], mx.float32) for n in NAMES), config=config, impl=impl,
                                 initial_state=None if state is None else to_mlx(state, mx.float32),
                                 output_final_state=True, **kw)


def compare_outputs(config, x, state=None, impl="chunk", **kw):
    expected, final = dla_shared.dla_attention(*(x[n] for n in NAMES), config=config, initial_state=state,
                                               output_final_state=True, **{k: np.array(v) for k, v in kw.items()})
    o, final2 = run(impl, config, x, state, **kw)
    assert_close("o", expected, o, 1e-5)
    assert_states_close(final, final2, 1e-5)


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200], ids=lambda T: f"T{T}")
@pytest.mark.parametrize("policy", POLICIES)
def test_mlx_chunk_equals_oracle(policy, T, delta):
    config = config_of(policy, 2, delta)
    x = make_inputs(config, 2, T, 2, 5, 3, delta=delta, seed=T + 1)
    compare_outputs(config, x)


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_mlx_chunk_continues_packs_and_pads(policy, delta):
    config = config_of(policy, 2, delta)
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
@pytest.mark.parametrize("impl", IMPLS)
def test_heads_open_at_their_own_thresholds(impl, delta):
    """Thresholds under which the oracle's heads open at clearly different rates: outputs, states and open
    counts equal the oracle's, and the counts continue exactly when the sequence runs in two pieces."""
    config = config_of("dla", 3, delta)
    x = make_inputs(config, 2, 100, 3, 4, 3, delta=delta, seed=7)
    assert_rates_differ(config, x)
    compare_outputs(config, x, impl=impl)
    _, final = dla_shared.dla_attention(*(x[n] for n in NAMES), config=config, output_final_state=True)
    piece = lambda s, e: {n: None if x[n] is None else x[n][:, s:e] for n in NAMES}
    _, middle = run(impl, config, piece(0, 37))
    _, final2 = run(impl, config, piece(37, 100), middle)
    assert_states_close(final, final2, 1e-5)


@pytest.mark.parametrize("impl", [*IMPLS, "metal"])
def test_threshold_of_the_wrong_length_is_refused(impl):
    config = config_for("dla", threshold=(0.2, 0.5, 0.9))
    x = make_inputs(config, 1, 5, 2, 4, 3)
    with pytest.raises(ValueError, match=r"DLAConfig.threshold has 3 values, one per head, but the input has H = 2"):
        run(impl, config, x)


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_mlx_chunk_gradients_equal_reference(policy, delta):
    config = config_of(policy, 2, delta)
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
