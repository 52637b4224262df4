"""impl="chunk" vs the exact reference (DESIGN section 5): outputs, final states and every gradient."""

import numpy as np
import pytest
import torch

import dla_shared
import dla_torch

from helpers import NAMES, POLICIES, TRANSITIONS, assert_close, compare, config_for, make_inputs, prefix_state, to_torch

LENGTHS = [pytest.param(T, id=f"T{T}") for T in (1, 63, 64, 65, 200)]


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
