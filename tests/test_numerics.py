"""The chunk paths at the edges of the log decay: g = -inf (a full reset, allowed by g <= 0) and very
negative finite g cumulated over a chunk give the oracle's outputs and final states, finite, in every backend
(Triton in its interpreter, float32); a non-finite input never reaches earlier tokens or other heads; a NaN
merge density picks the pair numpy's argmin picks in every impl, the compiled loops and kernels included."""

import mlx.core as mx
import numpy as np
import pytest
import torch

import dla_mlx
import dla_shared
import dla_torch

from helpers import (
    NAMES,
    assert_close,
    assert_states_close,
    config_for,
    make_inputs,
    needs_c,
    prefix_state,
    to_mlx,
    to_numpy,
    to_torch,
)

BACKENDS = {  # name: (op, convert inputs, impl, tolerance vs the float64 oracle)
    "torch-chunk": (dla_torch.dla_attention, to_torch, "chunk", 1e-10),
    "torch-triton": (dla_torch.dla_attention, lambda x: to_torch(x, torch.float32), "triton", 2e-3),
    "mlx-chunk": (dla_mlx.dla_attention, to_mlx, "chunk", 1e-6),  # MLX's exp is float32-accurate
}
T = 80  # two chunks of 64


def reset_at(t):
    def edit(g):
        g[:, t] = -np.inf
    return edit


def large_from(t):
    def edit(g):
        g[:, t:] = -1e4
    return edit


EDITS = {"g=-inf at t=5": reset_at(5), "g=-inf at a chunk start": reset_at(64),
         "g=-1e4 over a chunk": large_from(3)}


# Triton in its interpreter is slow: the delta rule only (the floor is applied before any kernel runs).
CASES = [pytest.param(backend, delta, id=f"{backend}-{'delta' if delta else 'diagonal'}")
         for backend in BACKENDS for delta in (False, True) if delta or backend != "torch-triton"]


@pytest.mark.parametrize("backend, delta", CASES)
@pytest.mark.parametrize("edit", EDITS)
def test_chunk_paths_at_extreme_decay_equal_the_oracle(edit, delta, backend):
    attention, convert, impl, tol = BACKENDS[backend]
    config = config_for("dla")
    x = make_inputs(config, 2, T, 2, 5, 7, delta=delta, seed=4)
    EDITS[edit](x["g"])
    o, state = dla_shared.dla_attention(*(x[n] for n in NAMES), config=config, output_final_state=True)
    assert np.isfinite(o).all()
    o2, state2 = attention(*(None if x[n] is None else convert(x[n]) for n in NAMES), config=config,
                           output_final_state=True, impl=impl)
    assert_close("o", o, o2, tol)
    assert_states_close(state, state2, tol)


NAN_CASES = [pytest.param(backend, delta, name, id=f"{backend}-{'delta' if delta else 'diagonal'}-{name}")
             for backend in BACKENDS for delta in (False, True) for name in ("k", "v", "g", "beta")
             if (delta or name != "beta") and (backend != "torch-triton" or (delta and name == "k"))]


@pytest.mark.parametrize("backend, delta, name", NAN_CASES)
def test_a_nan_stays_out_of_earlier_tokens_and_other_heads(backend, delta, name):
    """A NaN in one token's k, v, g or beta: the earlier tokens and the other head equal the oracle's, and
    the head's outputs are NaN from that token on (the chunk paths set all of them, the oracle some)."""
    attention, convert, impl, tol = BACKENDS[backend]
    config = config_for("dla")
    x = make_inputs(config, 1, 20, 2, 5, 7, delta=delta, seed=4)
    x[name][0, 3, 0, ...] = np.nan
    o = dla_shared.dla_attention(*(x[n] for n in NAMES), config=config)[0]
    o2, state = attention(*(None if x[n] is None else convert(x[n]) for n in NAMES), config=config, impl=impl,
                          output_final_state=True)
    o2 = to_numpy(o2)
    assert np.isnan(o2[0, 3:, 0]).all()
    assert np.isnan(to_numpy(state.S[0, 0])).all()
    assert_close("o before the NaN", o[:, :3], o2[:, :3], tol)
    assert_close("o of the other head", o[:, :, 1], o2[:, :, 1], tol)


IMPLS = [(backend, impl) for backend in ("torch", "mlx") for impl in ("reference", "step", "cpu", "chunk")]
NAN_DENSITY_IMPLS = [pytest.param(backend, impl, id=f"{backend}-{impl}", marks=[needs_c] if impl == "cpu" else [])
                     for backend, impl in [*IMPLS, ("torch", "triton"), ("mlx", "metal")]]


@pytest.mark.parametrize("T", [1, 3], ids=["decode", "prefill"])
@pytest.mark.parametrize("backend, impl", NAN_DENSITY_IMPLS)
def test_a_nan_density_merges_the_pair_numpys_argmin_picks(backend, impl, T, monkeypatch):
    """A full ``fixed`` cache merging by density, with one state's ibar NaN: every impl merges the oldest pair
    whose density is NaN, as numpy's argmin (the oracle's rule) picks it, not the least finite one. The
    compiled steps and scans, the Triton scan (interpreted) and the Metal kernels (emulated) decide in their
    own loops."""
    if impl == "metal":
        from dla_mlx.ops import metal

        from metal_emu.harness import emulate
        monkeypatch.setattr(metal, "run", emulate)
    config = config_for("fixed", merge="density")
    x = make_inputs(config, 2, 24 + T, 3, 5, 7, seed=2)
    state, tail = prefix_state(config, x, 24)
    assert (state.n == 6).all() and (state.pos == 24).all()  # full, and the next token opens a state
    state.ibar[0, 1, 2] = np.nan  # the densities of pairs (1, 2) and (2, 3) are NaN
    tail = [tail[n] for n in NAMES]
    n = dla_shared.dla_attention(*tail, config=config, initial_state=state, output_final_state=True)[1].n
    np.testing.assert_array_equal(n[0, 1], [T, 6, 6, 12])  # the pair (2, 3) merged
    convert = {"torch": to_torch, "mlx": to_mlx}[backend]
    dtype = {"triton": torch.float32, "metal": mx.float32}.get(impl)
    args = [None if a is None else convert(a) if dtype is None else convert(a, dtype) for a in tail]
    state = convert(state) if dtype is None else convert(state, dtype)
    attention = {"torch": dla_torch, "mlx": dla_mlx}[backend].dla_attention
    final = attention(*args, config=config, impl=impl, initial_state=state, output_final_state=True)[1]
    np.testing.assert_array_equal(to_numpy(final).n, n)
