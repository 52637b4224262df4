"""The MLX decode step (decisions on the device, one compiled step) against the MLX reference: the same
decisions and bookkeeping exactly, outputs and states within rounding, every policy, both transitions, with
merges active, padding, and continuation from a prefilled state."""

import mlx.core as mx
import numpy as np
import pytest

import dla_mlx
from dla_mlx.ops import attention

from helpers import NAMES, POLICIES, TRANSITIONS, assert_close, config_for, make_inputs, to_mlx

DTYPES = {"float64": (mx.float64, 1e-12), "float32": (mx.float32, 1e-5)}


def padded(B, T):
    mask = np.ones((B, T), bool)
    mask[1, :3] = False
    mask[1, 17:20] = False
    return mx.array(mask)


def assert_same_run(ref, step, tol):
    (o, state), (o2, state2) = ref, step
    assert_close("o", np.array(o), np.array(o2), tol)
    for field in ("n", "pos", "opened"):  # the decisions
        np.testing.assert_array_equal(np.array(getattr(state, field)), np.array(getattr(state2, field)), field)
    assert_close("S", np.array(state.S), np.array(state2.S), tol)
    assert_close("ibar", np.array(state.ibar), np.array(state2.ibar), tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_step_equals_the_reference(policy, delta, dtype):
    config = config_for(policy)
    x = make_inputs(config, 2, 40, 3, 5, 7, delta=delta, seed=3)
    inputs = [to_mlx(x[n], DTYPES[dtype][0]) for n in NAMES]
    run = lambda impl: dla_mlx.dla_attention(*inputs, config=config, mask=padded(2, 40), impl=impl,
                                             output_final_state=True)
    ref = run("reference")
    if policy != "single":  # more states opened than the cache holds: merges happened
        assert int(ref[1].opened.max()) > config.num_slots
    assert_same_run(ref, run("step"), DTYPES[dtype][1])


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_decoding_after_a_chunk_prefill_equals_the_reference(policy, delta):
    """Prefill 25 tokens with the chunk path, then decode one token per call, as a model does."""
    config = config_for(policy)
    x = {n: to_mlx(a) for n, a in make_inputs(config, 2, 40, 3, 5, 7, delta=delta, seed=5).items()}
    mask = padded(2, 40)
    part = lambda s, e: [None if x[n] is None else x[n][:, s:e] for n in NAMES]
    _, prefilled = dla_mlx.dla_attention(*part(0, 25), config=config, mask=mask[:, :25], impl="chunk",
                                         output_final_state=True)
    ref = dla_mlx.dla_attention(*part(25, 40), config=config, mask=mask[:, 25:], initial_state=prefilled,
                                impl="reference", output_final_state=True)
    state, outputs = prefilled, []
    for t in range(25, 40):
        o, state = dla_mlx.dla_attention(*part(t, t + 1), config=config, mask=mask[:, t : t + 1], initial_state=state,
                                         impl="step", output_final_state=True)
        outputs.append(o)
    assert_same_run(ref, (mx.concatenate(outputs, axis=1), state), 1e-12)


def test_auto_decodes_with_the_step_off_metal(monkeypatch):
    if mx.metal.is_available():
        pytest.skip("with Metal, auto decodes with the Metal kernel (tests/test_metal.py)")
    calls, step = [], attention.IMPLS["step"]

    def counted(*args, **kw):
        calls.append(args[0].shape)
        return step(*args, **kw)

    monkeypatch.setitem(attention.IMPLS, "step", counted)
    config = config_for("dla")
    x = make_inputs(config, 1, 3, 2, 4, 4, seed=1)
    inputs = [to_mlx(x[n], mx.float32) for n in NAMES]
    dla_mlx.dla_attention(*(a[:, :1] for a in inputs if a is not None), None, config=config)
    dla_mlx.dla_attention(*(a for a in inputs if a is not None), None, config=config)
    assert calls == [(1, 1, 2, 4)]  # one token: step; three: chunk


def test_step_refuses_an_overflowing_fenwick_cache_as_the_reference_does():
    config = config_for("fenwick", capacity=3)  # 3 levels hold 4 tokens
    x = make_inputs(config, 1, 6, 2, 4, 4, seed=1)
    inputs = [to_mlx(x[n]) for n in NAMES]
    errors = []
    for impl in ("reference", "step"):
        with pytest.raises(ValueError, match="holds at most 4 tokens") as error:
            dla_mlx.dla_attention(*inputs, config=config, impl=impl)
        errors.append(str(error.value))
    assert errors[0] == errors[1]
