"""The decode steps (decisions on the device; `dla_mlx.ops.step`, `dla_torch.ops.step`) against their
backend's reference: the same decisions and bookkeeping exactly, outputs and states within rounding, every
policy, both transitions, with merges active, padding, and continuation from a prefilled state; for torch also
every gradient."""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch

import dla_mlx
import dla_torch
from dla_mlx.ops import attention as mlx_attention
from dla_torch.ops import attention as torch_attention

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
    to_mlx,
    to_numpy,
    to_torch,
)

BACKENDS = {
    "mlx": SimpleNamespace(attention=dla_mlx.dla_attention, impls=mlx_attention.IMPLS, array=to_mlx,
                           dtypes={"float64": mx.float64, "float32": mx.float32}, mask=mx.array,
                           cat=lambda xs: mx.concatenate(xs, axis=1)),
    "torch": SimpleNamespace(attention=dla_torch.dla_attention, impls=torch_attention.IMPLS, array=to_torch,
                             dtypes={"float64": torch.float64, "float32": torch.float32}, mask=torch.tensor,
                             cat=lambda xs: torch.cat(xs, dim=1)),
}
TOLS = {"float64": 1e-12, "float32": 1e-5}


@pytest.fixture(params=BACKENDS)
def backend(request):
    return BACKENDS[request.param]


def padded(B, T):
    mask = np.ones((B, T), bool)
    mask[1, :3] = False
    mask[1, 17:20] = False
    return mask


def assert_same_run(ref, step, tol):
    (o, state), (o2, state2) = ref, step
    assert_close("o", to_numpy(o), to_numpy(o2), tol)
    assert_states_close(state, state2, tol)  # the decisions (n, pos, opened) exactly


@pytest.mark.parametrize("dtype", TOLS)
@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_step_equals_the_reference(backend, policy, delta, dtype):
    config = config_for(policy)
    x = make_inputs(config, 2, 40, 3, 5, 7, delta=delta, seed=3)
    inputs = [backend.array(x[n], backend.dtypes[dtype]) for n in NAMES]
    run = lambda impl: backend.attention(*inputs, config=config, mask=backend.mask(padded(2, 40)), impl=impl,
                                         output_final_state=True)
    ref = run("reference")
    if policy != "single":  # more states opened than the cache holds: merges happened
        assert int(ref[1].opened.max()) > config.num_slots
    assert_same_run(ref, run("step"), TOLS[dtype])


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_decoding_after_a_chunk_prefill_equals_the_reference(backend, policy, delta):
    """Prefill 25 tokens with the chunk path, then decode one token per call, as a model does."""
    config = config_for(policy)
    x = backend.array(make_inputs(config, 2, 40, 3, 5, 7, delta=delta, seed=5))
    mask = backend.mask(padded(2, 40))
    part = lambda s, e: [None if x[n] is None else x[n][:, s:e] for n in NAMES]
    _, prefilled = backend.attention(*part(0, 25), config=config, mask=mask[:, :25], impl="chunk",
                                     output_final_state=True)
    ref = backend.attention(*part(25, 40), config=config, mask=mask[:, 25:], initial_state=prefilled,
                            impl="reference", output_final_state=True)
    state, outputs = prefilled, []
    for t in range(25, 40):
        o, state = backend.attention(*part(t, t + 1), config=config, mask=mask[:, t : t + 1], initial_state=state,
                                     impl="step", output_final_state=True)
        outputs.append(o)
    assert_same_run(ref, (backend.cat(outputs), state), 1e-12)


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", ["fenwick", "dla"])
def test_torch_step_gradients_equal_the_reference(policy, delta):
    """float64, from a cache that holds states, with padding: outputs, final states and every gradient."""
    config = config_for(policy)
    x = make_inputs(config, 2, 20 + 30, 2, 5, 7, delta=delta, seed=6)
    state, tail = prefix_state(config, x, 20)
    compare(config, tail, torch.float64, state=state, impl="step", mask=torch.tensor(padded(2, 30)))


def test_auto_decodes_with_the_step(backend, monkeypatch):
    if backend.attention is dla_mlx.dla_attention and mx.metal.is_available():
        pytest.skip("with Metal, MLX's auto decodes with the Metal kernel (tests/test_metal.py)")
    calls, step = [], backend.impls["step"]

    def counted(*args, **kw):
        calls.append(tuple(args[0].shape))
        return step(*args, **kw)

    monkeypatch.setitem(backend.impls, "step", counted)
    config = config_for("dla")
    x = make_inputs(config, 1, 3, 2, 4, 4, seed=1)
    inputs = [backend.array(x[n], backend.dtypes["float32"]) for n in NAMES]
    backend.attention(*(a[:, :1] for a in inputs if a is not None), None, config=config)
    backend.attention(*(a for a in inputs if a is not None), None, config=config)
    assert calls == [(1, 1, 2, 4)]  # one token: step; three: chunk


def test_step_refuses_an_overflowing_fenwick_cache_as_the_reference_does(backend):
    config = config_for("fenwick", capacity=3)  # 3 levels hold 4 tokens
    x = make_inputs(config, 1, 6, 2, 4, 4, seed=1)
    inputs = [backend.array(x[n]) for n in NAMES]
    errors = []
    for impl in ("reference", "step"):
        with pytest.raises(ValueError, match="holds at most 4 tokens") as error:
            backend.attention(*inputs, config=config, impl=impl)
        errors.append(str(error.value))
    assert errors[0] == errors[1]
