"""Property tests of the state cache (DESIGN section 5: invariants of the cache).

Hypothesis draws small random problems (policy, capacity, threshold, block size, shapes, seeds) and the
numpy float64 oracle runs them; `dla_shared.policy.step` is driven directly where that is clearer.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dla_torch
from dla_shared import DLAConfig, DLAState, dla_attention, inspect, policy
from dla_shared.config import SCORES

from helpers import POLICIES, TRANSITIONS, make_inputs, to_numpy, to_torch

FAST = settings(max_examples=120, deadline=None)


class Case(NamedTuple):
    config: DLAConfig
    x: dict  # q, k, v, g, lam, beta (numpy float64)
    mask: np.ndarray | None  # [B, T] bool
    cu_seqlens: np.ndarray | None  # [N + 1]

    @property
    def seq(self):
        return {name: self.x[name] for name in ("q", "k", "v", "g", "beta")}


@st.composite
def configs(draw, policies=POLICIES, merges=("density", "oldest"), T=40, H=None) -> DLAConfig:
    """A config whose cache is small enough that merges happen within ``T`` tokens; with ``H``, the
    threshold is one number or one per head."""
    name = draw(st.sampled_from(policies))
    merge = draw(st.sampled_from(merges))
    if name == "fenwick":  # enough levels for T tokens: T <= 2 ** (capacity - 1)
        capacity = draw(st.integers(max(2, (T - 1).bit_length() + 1), 8))
    else:
        capacity = draw(st.integers(2, 5))
    threshold = st.floats(0.05, 1.5)
    threshold = threshold if H is None else threshold | st.tuples(*[threshold] * H)
    return DLAConfig(policy=name, capacity=capacity, merge=merge, score=draw(st.sampled_from(SCORES)),
                     threshold=draw(threshold), block_size=draw(st.integers(1, 7)))


@st.composite
def cases(draw, policies=POLICIES, merges=("density", "oldest"), layouts=("batch",), delta=None) -> Case:
    """Random inputs; ``layout`` is ``batch`` (B rows), ``mask`` (rows with random padding) or ``packed``
    (sequences packed in one row with ``cu_seqlens``)."""
    T, H = draw(st.integers(1, 40)), draw(st.integers(1, 2))
    config = draw(configs(policies, merges, T, H))
    layout = draw(st.sampled_from(layouts))
    B = 1 if layout == "packed" else draw(st.integers(1, 2))
    Dk, Dv = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    delta = draw(st.booleans()) if delta is None else delta
    seed = draw(st.integers(0, 2**32 - 1))
    x = make_inputs(config, B=B, T=T, H=H, Dk=Dk, Dv=Dv, delta=delta, seed=seed, switch=draw(st.floats(0, 0.5)))
    rng = np.random.default_rng(seed + 1)
    mask = cu_seqlens = None
    if layout == "mask":
        mask = rng.random((B, T)) >= draw(st.floats(0, 0.6))
    elif layout == "packed":
        cuts = rng.choice(np.arange(1, T), size=min(T - 1, draw(st.integers(0, 3))), replace=False)
        cu_seqlens = np.array([0, *sorted(cuts), T])
    return Case(config, x, mask, cu_seqlens)


def run_inspect(case: Case):
    return inspect(**case.seq, config=case.config, mask=case.mask, cu_seqlens=case.cu_seqlens)


def run_final(case: Case, config=None):
    config = case.config if config is None else config
    return dla_attention(**case.seq, config=config, mask=case.mask, cu_seqlens=case.cu_seqlens,
                         output_final_state=True)[1]


def active_tokens(trace):
    """(b, t) of every token that is not padding."""
    return list(zip(*np.nonzero(trace.pos >= 0)))


def is_packed(n) -> bool:
    """Occupied slots form a prefix: no empty slot before an occupied one."""
    occupied = n > 0
    return not np.any(~occupied[:-1] & occupied[1:])


# ---------------------------------------------------------------------------------------------------
# Capacity


@FAST
@given(cases(policies=("fixed", "dla"), layouts=("batch", "mask")))
def test_fixed_and_dla_never_exceed_capacity(case):
    trace = run_inspect(case)
    assert trace.occupancy.max() <= case.config.capacity
    assert run_final(case).num_states.max() <= case.config.capacity


@FAST
@given(cases(policies=("fenwick",), layouts=("batch", "mask")))
def test_fenwick_uses_only_the_levels_its_position_needs(case):
    trace = run_inspect(case)
    for b, t in active_tokens(trace):
        p = int(trace.pos[b, t])  # p + 1 tokens seen: level 0 holds the newest, level l >= 1 bit l - 1 of p
        expected = [1] + [((p >> (level - 1)) & 1) << (level - 1) for level in range(1, case.config.capacity)]
        for h in range(trace.n.shape[2]):
            n = trace.n[b, t, h]
            assert np.count_nonzero(n) <= p.bit_length() + 1
            np.testing.assert_array_equal(n, expected, err_msg=f"pos {p}")


@FAST
@given(cases(policies=("single",), layouts=("batch", "mask")))
def test_single_holds_exactly_one_state_once_a_token_was_seen(case):
    trace = run_inspect(case)
    for b, t in active_tokens(trace):
        np.testing.assert_array_equal(trace.occupancy[b, t], 1)
    final = run_final(case)
    seen = final.pos > 0
    np.testing.assert_array_equal(final.num_states[seen], 1)
    np.testing.assert_array_equal(final.num_states[~seen], 0)


# ---------------------------------------------------------------------------------------------------
# Time order


@FAST
@given(cases(layouts=("batch", "mask")))
def test_spans_are_contiguous_newest_first_and_cover_the_sequence(case):
    trace = run_inspect(case)
    config = case.config
    for b, t in active_tokens(trace):
        p = int(trace.pos[b, t])
        for h in range(trace.n.shape[2]):
            spans = trace.spans(b, t, h)
            assert spans[0][1] == p + 1 and spans[-1][0] == 0, spans
            assert all(start <= end for start, end in spans), spans
            assert all(newer[0] == older[1] for newer, older in zip(spans, spans[1:])), spans
            # Every state starts at a token that opened one.
            opened = set(trace.pos[b, : t + 1][trace.opened[b, : t + 1, h]].tolist())
            starts = [start for start, end in spans if end > start]
            assert set(starts) <= opened, (starts, opened)
            if config.policy == "fixed":
                assert all(start % config.block_size == 0 for start in starts), starts
            if config.policy in ("fixed", "dla"):
                assert is_packed(trace.n[b, t, h]), trace.n[b, t, h]


# ---------------------------------------------------------------------------------------------------
# Token counts


@FAST
@given(cases(layouts=("batch", "mask", "packed")))
def test_token_counts_sum_to_tokens_seen(case):
    trace = run_inspect(case)
    for b, t in active_tokens(trace):
        np.testing.assert_array_equal(trace.n[b, t].sum(-1), trace.pos[b, t] + 1)
    final = run_final(case)
    np.testing.assert_array_equal(final.n.sum(-1), np.broadcast_to(final.pos[:, None], final.n.shape[:2]))
    if case.cu_seqlens is not None:
        expected = np.diff(case.cu_seqlens)
    elif case.mask is not None:
        expected = case.mask.sum(-1)
    else:
        expected = np.full(case.x["q"].shape[0], case.x["q"].shape[1])
    np.testing.assert_array_equal(final.pos, expected)


@FAST
@given(cases(layouts=("batch", "mask", "packed")))
def test_opened_counts_the_boundaries_after_each_sequence_first_token(case):
    trace = run_inspect(case)
    boundaries = trace.opened & (trace.pos > 0)[..., None]  # [B, T, H]
    if case.cu_seqlens is None:
        expected = boundaries.sum(1)
    else:
        expected = [boundaries[0, s:e].sum(0) for s, e in zip(case.cu_seqlens[:-1], case.cu_seqlens[1:])]
    np.testing.assert_array_equal(run_final(case).opened, expected)


@FAST
@given(cases(), st.data())
def test_token_counts_sum_to_tokens_seen_across_a_continued_sequence(case, data):
    T = case.x["q"].shape[1]
    cut = data.draw(st.integers(0, T), label="cut")
    first = {name: None if x is None else x[:, :cut] for name, x in case.seq.items()}
    rest = {name: None if x is None else x[:, cut:] for name, x in case.seq.items()}
    state = dla_attention(**first, config=case.config, output_final_state=True)[1]
    trace = inspect(**rest, config=case.config, initial_state=state)
    np.testing.assert_array_equal(trace.pos, np.broadcast_to(np.arange(cut, T), trace.pos.shape))
    np.testing.assert_array_equal(trace.n.sum(-1), np.broadcast_to(trace.pos[..., None] + 1, trace.n.shape[:3]))


# ---------------------------------------------------------------------------------------------------
# Merges conserve the state sum


@pytest.mark.parametrize("delta", TRANSITIONS)
@FAST
@given(data=st.data())
def test_states_sum_to_the_single_state_model(delta, data):
    case = data.draw(cases(layouts=("batch", "mask"), delta=delta), label="case")
    final = run_final(case)
    single = run_final(case, DLAConfig(policy="single", eps=case.config.eps))
    np.testing.assert_allclose(final.S.sum(axis=2), single.S[:, :, 0], rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(final.n.sum(-1), single.n[..., 0])


@FAST
@given(configs(T=64), st.lists(st.floats(0, 2), min_size=1, max_size=64))
def test_policy_step_conserves_counts_and_scores(config, scores):
    """Drive `policy.step` + `policy.apply` directly: moving by ``dest`` neither loses nor makes tokens or
    score, and keeps the states in time order (``dest`` never swaps two states)."""
    L = config.num_slots
    n, ibar = np.zeros(L, np.int64), np.zeros(L)
    for pos, score in enumerate(scores):
        score = score if n.any() else 0.0
        s = policy.step(config, n, ibar, pos, score)
        assert np.all(np.diff(s.dest) >= 0), s.dest
        moved_n, moved_ibar = policy.apply(s.dest, n), policy.apply(s.dest, ibar)
        assert moved_n.sum() == n.sum()
        assert moved_ibar.sum() == pytest.approx(ibar.sum(), rel=1e-12, abs=1e-12)
        # State matrices move the same way: the transfer matrix keeps their sum.
        states = np.random.default_rng(pos).standard_normal((L, 2, 3))
        moved = np.einsum("ij,jkv->ikv", policy.transfer_matrix(s.dest, np.float64), states)
        np.testing.assert_allclose(moved.sum(0), states.sum(0), rtol=1e-12, atol=1e-12)
        n, ibar = moved_n, moved_ibar
        n[0] += 1
        ibar[0] += score
        assert n.sum() == pos + 1


# ---------------------------------------------------------------------------------------------------
# DLA merges the least dense adjacent pair


def least_dense_pair(n, ibar) -> int:
    """Index i of the adjacent occupied pair (i, i + 1) of least (Ibar_i + Ibar_i+1) / (n_i + n_i+1);
    ties go to the oldest pair (largest i)."""
    m = sum(1 for count in n if count > 0)
    best, best_density = None, None
    for i in range(m - 1):
        density = (float(ibar[i]) + float(ibar[i + 1])) / (int(n[i]) + int(n[i + 1]))
        if best is None or density <= best_density:
            best, best_density = i, density
    return best


def merged(n, i) -> list:
    """Counts after merging pair (i, i + 1) and opening a new state in front."""
    n = [int(c) for c in n]
    return [0, *n[:i], n[i] + n[i + 1], *n[i + 2 :]]


@FAST
@given(cases(policies=("dla", "fixed"), merges=("density",), layouts=("batch", "mask")))
def test_density_merge_takes_the_least_dense_adjacent_pair(case):
    """Replay the oracle's bookkeeping from its trace; at every merge, recompute the expected pair."""
    config, trace = case.config, run_inspect(case)
    B, T, H, L = trace.n.shape
    merges = 0
    for b in range(B):
        for h in range(H):
            head_config = dataclasses.replace(config, threshold=float(config.thresholds(H)[h]))
            n, ibar, pos = np.zeros(L, np.int64), np.zeros(L), 0
            for t in range(T):
                if trace.pos[b, t] < 0:
                    continue
                score = float(trace.score[b, t, h])
                full = np.count_nonzero(n) == L
                slot = int(trace.merge_slot[b, t, h])
                if slot >= 0:
                    merges += 1
                    assert full and trace.opened[b, t, h]
                    i = least_dense_pair(n, ibar)
                    assert slot == i + 1, (n, ibar, slot)
                    np.testing.assert_array_equal(trace.n[b, t, h], np.add(merged(n, i), [1] + [0] * (L - 1)))
                else:
                    assert not (full and trace.opened[b, t, h]), "a full cache opened a state without merging"
                s = policy.step(head_config, n, ibar, pos, score)
                n, ibar = policy.apply(s.dest, n), policy.apply(s.dest, ibar)
                n[0] += 1
                ibar[0] += score
                pos += 1
                np.testing.assert_array_equal(n, trace.n[b, t, h])


@FAST
@given(st.integers(2, 6).flatmap(lambda L: st.tuples(
    st.lists(st.integers(1, 4), min_size=L, max_size=L),
    st.lists(st.integers(0, 4), min_size=L, max_size=L))))
def test_density_merge_breaks_ties_toward_the_oldest_pair(bookkeeping):
    """Small integer bookkeeping makes equal densities common; a full cache at a boundary must merge the
    least dense pair, the oldest of equals, and shift the rest one slot older."""
    n, ibar = (np.array(x) for x in bookkeeping)
    config = DLAConfig(policy="dla", capacity=len(n), merge="density", threshold=0.6)
    s = policy.step(config, n, ibar.astype(float), int(n.sum()), score=config.threshold)
    i = least_dense_pair(n, ibar)
    assert s.opened and s.merge_slot == i + 1, (n, ibar, s)
    np.testing.assert_array_equal(policy.apply(s.dest, n), merged(n, i))


# ---------------------------------------------------------------------------------------------------
# A masked token changes nothing


def insert_padding(x: dict, seed: int):
    """Insert masked garbage tokens at random places in every row (0 to 2 per gap, different per row).

    Returns the padded inputs, their mask, and for each row the new index of each original token.
    """
    rng = np.random.default_rng(seed)
    B, T = x["q"].shape[:2]
    places = [np.arange(T) + np.cumsum(rng.integers(0, 3, size=T)) for _ in range(B)]
    T_pad = max(int(p[-1]) for p in places) + 1 + int(rng.integers(0, 3))
    mask = np.zeros((B, T_pad), bool)
    padded = {}
    for name, value in x.items():
        if value is None:
            padded[name] = None
            continue
        garbage = 10 * rng.standard_normal((B, T_pad) + value.shape[2:])
        if name == "g":
            garbage = -np.abs(garbage)
        elif name in ("beta", "lam"):
            garbage = np.abs(garbage)
        padded[name] = garbage
    for b, p in enumerate(places):
        mask[b, p] = True
        for name, value in x.items():
            if value is not None:
                padded[name][b, p] = value[b]
    return padded, mask, places


def assert_padding_changes_nothing(o, state, o_pad, state_pad, mask, places, tol=0.0):
    for b, p in enumerate(places):
        np.testing.assert_allclose(o_pad[b, p], o[b], rtol=0, atol=tol)
    np.testing.assert_array_equal(o_pad[~mask], 0)
    for name in DLAState.FIELDS:
        np.testing.assert_allclose(getattr(state_pad, name), getattr(state, name), rtol=0, atol=tol,
                                   err_msg=name)


@FAST
@given(cases(), st.integers(0, 2**32 - 1))
def test_masked_tokens_change_nothing(case, seed):
    padded, mask, places = insert_padding(case.x, seed)
    o, state = dla_attention(**case.x, config=case.config, output_final_state=True)
    o_pad, state_pad = dla_attention(**padded, config=case.config, mask=mask, output_final_state=True)
    assert_padding_changes_nothing(o, state, o_pad, state_pad, mask, places)
    trace = inspect(**{k: v for k, v in padded.items() if k != "lam"}, config=case.config, mask=mask)
    assert np.all(trace.pos[~mask] == -1) and not trace.opened[~mask].any()
    assert np.isnan(trace.score[~mask]).all()


@pytest.mark.parametrize("delta", TRANSITIONS)
def test_masked_tokens_change_nothing_torch_reference(delta):
    config = DLAConfig(policy="dla", capacity=3, threshold=0.5)
    x = make_inputs(config, B=2, T=24, H=2, Dk=3, Dv=4, delta=delta, seed=7, switch=0.3)
    padded, mask, places = insert_padding(x, seed=8)
    o, state = dla_torch.dla_attention(**to_torch(x), config=config, output_final_state=True)
    o_pad, state_pad = dla_torch.dla_attention(**to_torch(padded), config=config, mask=torch.tensor(mask),
                                               output_final_state=True)
    assert inspect(**{k: v for k, v in x.items() if k != "lam"}, config=config).merge_slot.max() >= 0
    assert_padding_changes_nothing(to_numpy(o), to_numpy(state), to_numpy(o_pad), to_numpy(state_pad), mask,
                                   places, tol=1e-12)
