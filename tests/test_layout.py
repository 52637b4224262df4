"""The physical layout of `DLAState` (`dla_shared.state`): slot i's state is ``decay * S[..., slot[i], :, :]``.

The compiled decode step (``impl="cpu"``) keeps its states so: a token moves no buffer and rescales none (one
decay per cache, DESIGN section 3), so with the diagonal transition it writes only the buffers that change.
Every impl of both backends continues a state in either layout as the oracle continues the canonical one;
the decay is taken into the buffers before it underflows; a malformed layout is refused by name.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dla_mlx
import dla_shared
import dla_torch
from dla_shared import DLAConfig, DLAState, decode
from dla_shared.state import canonical

from helpers import (
    NAMES,
    POLICIES,
    TRANSITIONS,
    assert_close,
    assert_states_close,
    config_for,
    make_inputs,
    needs_c,
    prefix_state,
    scrambled,
    to_mlx,
    to_torch,
)

# mlx's exp is float32-accurate even on float64 arrays (tests/test_references.py)
BACKENDS = {"mlx": SimpleNamespace(attention=dla_mlx.dla_attention, array=to_mlx, tol=1e-7),
            "torch": SimpleNamespace(attention=dla_torch.dla_attention, array=to_torch, tol=1e-12)}
IMPLS = ["reference", "step", pytest.param("cpu", marks=needs_c), "chunk"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_impl_continues_a_state_in_either_layout(backend, policy, delta, impl):
    backend = BACKENDS[backend]
    config = config_for(policy)
    x = make_inputs(config, 2, 30, 3, 5, 7, delta=delta, seed=7)
    o, final = dla_shared.dla_attention(*(x[n] for n in NAMES), config=config, output_final_state=True)
    prefix, tail = prefix_state(config, x, 18)
    state = scrambled(prefix)
    assert (state.slot != np.arange(config.num_slots)).any() or policy == "single"  # not the canonical layout
    o2, final2 = backend.attention(*(backend.array(tail[n]) for n in NAMES), config=config, impl=impl,
                                   initial_state=backend.array(state), output_final_state=True)
    assert_close("o", o[:, 18:], o2, backend.tol)
    assert_states_close(final, final2, backend.tol)
    assert (final2.slot is not None) == (impl == "cpu")  # the compiled step keeps the physical layout


def run_tokens(config, x, state=None):
    """`dla_shared.decode` one token per call, as a model decodes: the outputs [B, T, H, Dv] and the state
    (numpy) after each token."""
    states, outputs = [], []
    books = () if state is None else tuple(getattr(state, f) for f in DLAState.FIELDS + DLAState.LAYOUT)
    B, T, H = x["g"].shape
    if state is None:
        L, Dk, Dv = config.num_slots, x["k"].shape[-1], x["v"].shape[-1]
        books = (np.zeros((B, H, L, Dk, Dv)), np.zeros((B, H, L), np.int64), np.zeros((B, H, L)),
                 np.zeros(B, np.int64), np.zeros((B, H), np.int64), None, None)
    for t in range(T):
        step = [None if x[n] is None else x[n][:, t : t + 1] for n in NAMES]
        o, *books = decode.decode(config, 1.0, *step, np.ones((B, 1), bool), *books)
        outputs.append(o)
        states.append(DLAState(*books[:5], slot=books[5], decay=books[6]))
    return np.concatenate(outputs, axis=1), states


@needs_c
@pytest.mark.parametrize("policy", ["dla", "fixed", "fenwick"])
def test_a_diagonal_step_writes_only_the_buffers_that_change(policy):
    """With the diagonal transition a token changes the buffer of slot 0 and those of the slots whose token
    count it changes (a merge, a fenwick fold), and the decay; no buffer is rescaled or moved. The outputs and
    states stay the oracle's."""
    config = config_for(policy)
    x = make_inputs(config, 2, 40, 3, 5, 7, seed=11)
    o, states = run_tokens(config, x)
    ref, final = dla_shared.dla_attention(*(x[n] for n in NAMES), config=config, output_final_state=True)
    assert_close("o", ref, o, 1e-12)
    assert_states_close(final, states[-1], 1e-12)
    quiet = opening = 0
    for before, after in zip(states, states[1:]):
        for b, h in np.ndindex(before.n.shape[:2]):
            count = lambda s: dict(zip(s.slot[b, h].tolist(), s.n[b, h].tolist()))  # buffer: its slot's tokens
            allowed = {after.slot[b, h, 0]} | {p for p, c in count(before).items() if count(after)[p] != c}
            changed = {p for p in range(config.num_slots) if (before.S[b, h, p] != after.S[b, h, p]).any()}
            assert changed <= allowed
            if after.opened[b, h] == before.opened[b, h]:
                assert (after.slot[b, h] == before.slot[b, h]).all() and len(changed) == 1
                quiet += 1
            else:
                opening += 1
            assert after.decay[b, h] < before.decay[b, h]  # g < 0: the decay, not the buffers, took it in
    assert (quiet > 50 or policy == "fenwick") and opening > 10


@needs_c
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("delta", TRANSITIONS)
def test_the_decay_is_taken_into_the_buffers_before_it_underflows(delta, dtype):
    """Decays of e^-3 per token for 40 tokens (e^-120 is 0 in float32) and a reset (g = -inf): the decay stays
    at least 2^-40 and the outputs and states stay the reference's."""
    config = config_for("dla")
    x = make_inputs(config, 2, 40, 3, 5, 7, delta=delta, seed=2)
    x["g"][:] = -3.0
    x["g"][1, 20, 2] = -np.inf
    x = {n: None if a is None else a.astype(dtype) for n, a in x.items()}
    o, states = run_tokens(config, x)
    ref, final = dla_torch.dla_attention(*(to_torch(x[n], getattr(torch, dtype.__name__)) for n in NAMES),
                                         config=config, impl="reference", output_final_state=True)
    assert min(s.decay.min() for s in states) >= 2.0**-40
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert_close("o", ref, o, tol)
    assert_states_close(final, states[-1], tol)


@needs_c
@pytest.mark.parametrize("where", ["v", "g"])
def test_a_non_finite_input_spreads_as_in_the_oracle(where):
    """NaN in one token's v or g: the compiled step's outputs and states are NaN exactly where the oracle's are."""
    config = config_for("dla")
    x = make_inputs(config, 2, 20, 3, 5, 7, seed=6)
    x[where][0, 9, 1] = np.nan
    o, states = run_tokens(config, x)
    ref, final = dla_shared.dla_attention(*(x[n] for n in NAMES), config=config, output_final_state=True)
    np.testing.assert_array_equal(np.isnan(o), np.isnan(ref))
    S = canonical(states[-1]).S
    np.testing.assert_array_equal(np.isnan(S), np.isnan(final.S))
    assert np.isnan(S).any()
    finite = ~np.isnan(ref)
    np.testing.assert_allclose(o[finite], ref[finite], rtol=1e-10, atol=1e-12)


def test_canonical_undoes_a_scrambled_layout():
    config = config_for("dla")
    x = make_inputs(config, 2, 30, 3, 5, 7, seed=1)
    state, _ = prefix_state(config, x, 20)
    np.testing.assert_allclose(canonical(scrambled(state, seed=4)).S, state.S, rtol=1e-15)
    assert canonical(state) is state


def test_the_compiled_step_refuses_a_slot_map_that_is_not_a_permutation():
    """The C loop indexes the states with ``slot``: an out-of-range or repeated buffer, or a slot map without
    its decay, is refused before it runs (as a corrupted prompt cache would bring it)."""
    config = config_for("dla")
    x = make_inputs(config, 2, 13, 3, 5, 7, seed=1)
    state = scrambled(prefix_state(config, x, 12)[0])
    step = [x[n][:, 12:] for n in NAMES[:-1]] + [None, np.ones((2, 1), bool)]
    books = [getattr(state, f) for f in DLAState.FIELDS]
    for slot in (np.full_like(state.slot, 10**8), np.zeros_like(state.slot)):
        with pytest.raises(ValueError, match="slot must give each .* a permutation of its buffers"):
            decode.decode(config, 1.0, *step, *books, slot, state.decay)
    with pytest.raises(ValueError, match="slot and decay come together"):
        decode.decode(config, 1.0, *step, *books, state.slot, None)


@pytest.mark.parametrize("edit, message", [
    ({"decay": None}, "initial_state.slot and initial_state.decay come together"),
    ({"slot": lambda s: s[..., :-1]}, r"initial_state.slot must have shape \[2, 3, 4\]"),
    ({"slot": lambda s: np.zeros_like(s)}, "initial_state.slot must give each .* a permutation"),
    ({"decay": lambda d: -d}, "initial_state.decay must be finite and > 0"),
], ids=["slot-without-decay", "slot-shape", "slot-not-a-permutation", "negative-decay"])
def test_a_malformed_layout_is_refused(edit, message):
    config = DLAConfig(policy="dla", capacity=4, threshold=0.5)
    x = make_inputs(config, 2, 12, 3, 5, 7, seed=1)
    state = scrambled(prefix_state(config, x, 6)[0])
    fields = {f: getattr(state, f) for f in DLAState.FIELDS + DLAState.LAYOUT}
    fields |= {f: None if fn is None else fn(fields[f]) for f, fn in edit.items()}
    with pytest.raises(ValueError, match=message):
        dla_torch.dla_attention(*(to_torch(x[n]) for n in NAMES), config=config,
                                initial_state=to_torch(DLAState(**fields)))


@needs_c
@pytest.mark.parametrize("delta", TRANSITIONS)
def test_a_donated_state_is_written_in_place_with_the_same_result(delta):
    """``donate_state`` (what the torch models' caches pass): impl="cpu" writes the final states into the initial
    state's tensor instead of a copy, and returns what it returns without donating."""
    config = config_for("dla")
    x = make_inputs(config, 2, 20, 3, 5, 7, delta=delta, seed=3)
    prefix, tail = prefix_state(config, x, 12)
    runs = []
    for donate in (False, True):
        state = to_torch(scrambled(prefix))
        before = state.S.clone()
        o, final = dla_torch.dla_attention(*(to_torch(tail[n]) for n in NAMES), config=config, impl="cpu",
                                           initial_state=state, output_final_state=True, donate_state=donate)
        assert (final.S.data_ptr() == state.S.data_ptr()) == donate
        assert torch.equal(state.S, before) != donate
        runs.append((o, final))
    assert torch.equal(runs[0][0], runs[1][0])
    assert_states_close(runs[0][1], runs[1][1], 0)
