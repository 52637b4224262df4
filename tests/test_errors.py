"""Bad input gets a clear error naming the argument (DESIGN section 5), in every entry point of the op and in
`DLAConfig`; plus the config's JSON round trip."""

from __future__ import annotations

import dataclasses
import math
import re

import mlx.core as mx
import numpy as np
import pytest
import torch

import dla_mlx
import dla_shared
import dla_torch
from dla_shared import DLAConfig, DLAState

CONFIG = DLAConfig(policy="dla", capacity=3)
B, T, H, Dk, Dv, L = 2, 5, 2, 3, 4, CONFIG.num_slots

ENTRY_POINTS = {"oracle": dla_shared.dla_attention, "torch": dla_torch.dla_attention, "mlx": dla_mlx.dla_attention}
TO_BACKEND = {"oracle": lambda x: x, "torch": torch.tensor, "mlx": mx.array}  # all keep numpy's dtype


def valid_args() -> dict:
    """Well-formed float32 arguments of the op (numpy), including beta."""
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    return {"q": normal(B, T, H, Dk), "k": normal(B, T, H, Dk), "v": normal(B, T, H, Dv),
            "g": -np.abs(normal(B, T, H)), "lam": np.abs(normal(B, T, H, L)),
            "beta": rng.random((B, T, H)).astype(np.float32), "config": CONFIG}


def call(entry: str, args: dict, **extra):
    """Run one entry point on numpy ``args``, converted to its backend (DLAState fields too)."""
    convert = TO_BACKEND[entry]

    def to_backend(x):
        if isinstance(x, DLAState):
            return x.map(lambda f, a: convert(a))
        return convert(x) if isinstance(x, np.ndarray) else x

    return ENTRY_POINTS[entry](**{name: to_backend(x) for name, x in args.items()}, **extra)


def with_(**changes):
    """A mutation of the valid arguments: replace some of them (a callable gets the old value)."""
    def mutate(args):
        return {**args, **{name: new(args.get(name)) if callable(new) else new for name, new in changes.items()}}
    return mutate


def one_row(**changes):
    """Like `with_`, on the first batch row only (B == 1, as cu_seqlens needs)."""
    def mutate(args):
        args = {name: x[:1] if isinstance(x, np.ndarray) else x for name, x in args.items()}
        return with_(**changes)(args)
    return mutate


def empty_state(N=B, S=(B, H, L, Dk, Dv), n=(B, H, L), opened=None) -> DLAState:
    return DLAState(np.zeros(S, np.float32), np.zeros(n, np.int64), np.zeros(n, np.float32), np.zeros(N, np.int64),
                    np.zeros(opened or (N, H), np.int64))


def made_state(config=None) -> DLAState:
    """The oracle's state after the valid arguments' tokens (under ``config``, default theirs)."""
    args = valid_args()
    return dla_shared.dla_attention(*(args[n] for n in ("q", "k", "v", "g", "lam", "beta")),
                                    config=config or args["config"], output_final_state=True)[1]


def edited_state(**edits) -> DLAState:
    """`made_state` without its config (as if saved and loaded), fields edited."""
    state = made_state()
    return dataclasses.replace(state.map(lambda f, a: edits.get(f, lambda x: x)(a)), config=None)


ones_mask = lambda *shape: np.ones(shape, bool)
bad = lambda mutate, error, match, id: pytest.param(mutate, error, match, id=id)

BAD_INPUTS = [
    # shapes
    bad(with_(q=lambda q: q[..., 0]), ValueError, r"q must be \[B, T, H, Dk\]", "q-3d"),
    # the chunk paths reduce over heads: no heads once failed inside them, differently per impl
    bad(with_(q=lambda q: q[:, :, :0]), ValueError, r"at least one head and key dimension, got shape \(2, 5, 0, 3\)",
        "q-no-heads"),
    bad(with_(k=lambda k: k[..., :-1]), ValueError, r"k must have shape \[2, 5, 2, 3\]", "k-wrong-Dk"),
    bad(with_(k=lambda k: k[:, :-1]), ValueError, r"k must have shape", "k-wrong-T"),
    bad(with_(v=lambda v: v[..., 0]), ValueError, r"v must be \[B, T, H, Dv\]", "v-3d"),
    bad(with_(v=lambda v: v[:, :, :1]), ValueError, r"v must have shape \[2, 5, 2, 4\]", "v-heads-differ-from-q"),
    bad(with_(v=lambda v: v[:1]), ValueError, r"v must have shape", "v-wrong-B"),
    bad(with_(g=lambda g: g[..., None]), ValueError, r"g must have shape \[2, 5, 2\]", "g-extra-dim"),
    bad(with_(g=lambda g: g[:, :, :1]), ValueError, r"g must have shape", "g-wrong-heads"),
    bad(with_(g=lambda g: g + 20), ValueError, r"g must be <= 0 .*got a maximum of", "g-positive"),
    bad(with_(lam=lambda lam: lam[..., :2]), ValueError, r"lam must have shape.*config\.num_slots = 3",
        "lam-last-dim-not-num-slots"),
    bad(with_(lam=lambda lam: np.ones((B, T, H, 1), np.float32)), ValueError, r"lam must have shape.*num_slots",
        "lam-single-slot-for-dla"),
    bad(with_(beta=lambda beta: beta[..., None]), ValueError, r"beta must have shape \[2, 5, 2\]", "beta-extra-dim"),
    bad(with_(beta=lambda beta: beta[:, 1:]), ValueError, r"beta must have shape", "beta-wrong-T"),
    bad(with_(mask=ones_mask(B, T + 1)), ValueError, r"mask must have shape \[B, T\]", "mask-wrong-T"),
    bad(with_(mask=ones_mask(B, T, 1)), ValueError, r"mask must have shape", "mask-3d"),
    # dtypes
    bad(with_(q=lambda q: q.astype(np.int32)), TypeError, r"q must have a floating dtype", "q-int"),
    bad(with_(v=lambda v: v.astype(np.int64)), TypeError, r"v must have a floating dtype", "v-int"),
    bad(with_(g=lambda g: g.astype(bool)), TypeError, r"g must have a floating dtype", "g-bool"),
    bad(with_(lam=lambda lam: lam.astype(np.int32)), TypeError, r"lam must have a floating dtype", "lam-int"),
    bad(with_(mask=np.ones((B, T), np.float32)), TypeError, r"mask must be a bool", "mask-float"),
    bad(with_(mask=np.ones((B, T), np.int32)), TypeError, r"mask must be a bool", "mask-int"),
    # packed sequences
    bad(with_(cu_seqlens=np.array([0, T])), ValueError, r"cu_seqlens needs .*\(B == 1\)", "cu_seqlens-with-B-2"),
    bad(one_row(cu_seqlens=np.array([1, T])), ValueError, r"cu_seqlens must rise from 0 to T = 5",
        "cu_seqlens-not-from-0"),
    bad(one_row(cu_seqlens=np.array([0, 2, T - 1])), ValueError, r"cu_seqlens must rise from 0 to T",
        "cu_seqlens-not-to-T"),
    bad(one_row(cu_seqlens=np.array([0, 3, 2, T])), ValueError, r"cu_seqlens must rise", "cu_seqlens-decreasing"),
    bad(one_row(cu_seqlens=np.array([0.0, T])), ValueError,
        r"cu_seqlens must be a 1-D integer .*got dtype float(32|64)$", "cu_seqlens-float"),
    bad(one_row(cu_seqlens=np.array([[0, T]])), ValueError, r"cu_seqlens must be a 1-D integer", "cu_seqlens-2d"),
    bad(one_row(cu_seqlens=np.array([0, T]), mask=ones_mask(1, T)), ValueError, r"either mask or cu_seqlens",
        "mask-with-cu_seqlens"),
    # initial state
    bad(with_(initial_state=empty_state(S=(B, H, L, Dk, Dv + 1))), ValueError,
        r"initial_state\.S must have shape \[2, 2, 3, 3, 4\]", "initial_state-S-wrong-Dv"),
    bad(with_(initial_state=empty_state(S=(B, H, L + 1, Dk, Dv))), ValueError, r"initial_state\.S must have shape",
        "initial_state-S-wrong-slots"),
    bad(with_(initial_state=empty_state(n=(B, H, L + 1))), ValueError, r"initial_state\.n must have shape",
        "initial_state-n-wrong-slots"),
    bad(with_(initial_state=empty_state(N=B + 1)), ValueError, r"initial_state\.pos must have shape",
        "initial_state-pos-wrong-N"),
    bad(with_(initial_state=empty_state(opened=(B, H + 1))), ValueError,
        r"initial_state\.opened must have shape \[2, 2\]", "initial_state-opened-wrong-heads"),
    bad(one_row(cu_seqlens=np.array([0, 2, T]), initial_state=empty_state(N=1, S=(1, H, L, Dk, Dv), n=(1, H, L))),
        ValueError, r"initial_state\.S must have shape \[2, ", "initial_state-batch-not-num-sequences"),
    bad(with_(initial_state={"S": None}), TypeError, r"initial_state must be a DLAState", "initial_state-dict"),
    # bookkeeping no op could have made (a state without its config comes from outside)
    bad(with_(initial_state=edited_state(n=lambda n: n.astype(np.float32))), TypeError,
        r"initial_state\.n must hold integers, got float32", "initial_state-n-float"),
    bad(with_(initial_state=edited_state(n=lambda n: -n)), ValueError, r"initial_state\.n must be >= 0",
        "initial_state-n-negative"),
    bad(with_(initial_state=edited_state(pos=lambda pos: pos + 10**12)), ValueError,
        r"initial_state\.n must add up to initial_state\.pos", "initial_state-pos-1e12"),
    bad(with_(initial_state=edited_state(opened=lambda o: o + 5)), ValueError,
        r"initial_state\.opened cannot exceed pos - 1", "initial_state-opened-past-pos"),
    bad(with_(initial_state=edited_state(ibar=lambda x: x * np.nan)), ValueError, r"initial_state\.ibar must be finite",
        "initial_state-ibar-nan"),
    # a state continues only under the cache that made it
    bad(with_(initial_state=made_state(DLAConfig(policy="fixed", capacity=3))), ValueError,
        r"initial_state was made under policy='fixed' with 3 slots .* but config is policy='dla'",
        "initial_state-from-fixed"),
    bad(with_(initial_state=made_state(DLAConfig(policy="dla", capacity=3, threshold=0.9))), ValueError,
        r"initial_state was made under .*tau=\(0\.9, 0\.9\).* a state continues only under the cache that made it",
        "initial_state-other-thresholds"),
    # config
    bad(with_(config={"policy": "dla"}), TypeError, r"config must be a DLAConfig, got dict", "config-dict"),
    bad(with_(config=None), TypeError, r"config must be a DLAConfig, got NoneType", "config-None"),
    # scale
    bad(with_(scale=None), TypeError, r"scale must be a finite number, got None", "scale-None"),
    bad(with_(scale="2"), TypeError, r"scale must be a finite number, got '2'", "scale-str"),
    bad(with_(scale=float("nan")), TypeError, r"scale must be a finite number, got nan", "scale-nan"),
    bad(with_(config=DLAConfig(policy="dla", capacity=3, threshold=(0.2, 0.4, 0.6))), ValueError,
        r"DLAConfig\.threshold has 3 values, one per head, but the input has H = 2 heads", "threshold-wrong-length"),
]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("mutate, error, match", BAD_INPUTS)
def test_bad_input_names_the_argument(entry, mutate, error, match):
    with pytest.raises(error, match=match):
        call(entry, mutate(valid_args()))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_valid_input_runs(entry):
    """The baseline every bad case mutates is accepted (so each error comes from its one change)."""
    o, state = call(entry, with_(mask=ones_mask(B, T))(valid_args()), output_final_state=True)
    assert tuple(o.shape) == (B, T, H, Dv) and tuple(state.S.shape) == (B, H, L, Dk, Dv)
    o, _ = call(entry, one_row(cu_seqlens=np.array([0, 2, T]), initial_state=empty_state(
        N=2, S=(2, H, L, Dk, Dv), n=(2, H, L)))(valid_args()))
    assert tuple(o.shape) == (1, T, H, Dv)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_mask_and_cu_seqlens_may_be_lists(entry):
    """As the numpy oracle takes them: the same outputs as from arrays."""
    args = valid_args()
    mask = [[True] * T, [False] + [True] * (T - 1)]
    as_list, _ = call(entry, args, mask=mask)
    as_array, _ = call(entry, with_(mask=np.array(mask))(args))
    np.testing.assert_array_equal(np.array(as_list), np.array(as_array))
    row = one_row()(args)
    as_list, _ = call(entry, row, cu_seqlens=[0, 2, T])
    as_array, _ = call(entry, with_(cu_seqlens=np.array([0, 2, T]))(row))
    np.testing.assert_array_equal(np.array(as_list), np.array(as_array))


FOREIGN = {"torch": (lambda x: mx.array(x), r"torch\.Tensor .* got mlx\.core\.array"),
           "mlx": (lambda x: torch.tensor(x), r"mlx\.core\.array .* got torch\.Tensor")}


@pytest.mark.parametrize("name", ["q", "g", "beta", "initial_state.S", "initial_state.n"])
@pytest.mark.parametrize("entry", ["torch", "mlx"])
def test_arrays_of_another_framework_name_the_argument(entry, name):
    foreign, expected = FOREIGN[entry]
    args = {**valid_args(), "initial_state": made_state()}
    converted = {key: TO_BACKEND[entry](x) if isinstance(x, np.ndarray) else x for key, x in args.items()}
    state = converted["initial_state"]
    converted["initial_state"] = state.map(lambda f, a: TO_BACKEND[entry](a))
    if name.startswith("initial_state."):
        setattr(converted["initial_state"], name.split(".")[1], foreign(getattr(state, name.split(".")[1])))
    else:
        converted[name] = foreign(args[name])
    with pytest.raises(TypeError, match=rf"{re.escape(name)} must be a {expected}"):
        ENTRY_POINTS[entry](**converted)


@pytest.mark.parametrize("entry", ["torch", "mlx"])
@pytest.mark.parametrize("impl", ["fast", "", "Reference"], ids=["fast", "empty", "Reference"])
def test_unknown_impl_names_the_argument(entry, impl):
    with pytest.raises(ValueError, match=rf"impl must be one of \['auto', 'reference'.*\], got '{impl}'"):
        call(entry, valid_args(), impl=impl)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_fenwick_longer_than_its_levels_names_capacity(entry):
    """capacity levels hold 2 ** (capacity - 1) tokens: T = 4 fits 3 levels, T = 5 does not."""
    config = DLAConfig(policy="fenwick", capacity=3)
    args = {**valid_args(), "config": config, "lam": np.ones((B, T, H, 3), np.float32)}
    fits = {name: x[:, :4] if isinstance(x, np.ndarray) else x for name, x in args.items()}
    o, _ = call(entry, fits)
    assert tuple(o.shape) == (B, 4, H, Dv)
    with pytest.raises(ValueError, match=r"capacity=3 levels holds at most 4 tokens.*DLAConfig\.capacity"):
        call(entry, args)


# ---------------------------------------------------------------------------------------------------
# DLAConfig


@pytest.mark.parametrize("capacity", [0, -1, 1.5, True, "4", None], ids=lambda c: f"capacity={c!r}")
def test_config_capacity_must_be_a_positive_integer(capacity):
    with pytest.raises(ValueError, match=r"DLAConfig\.capacity must be an integer >= 1"):
        DLAConfig(capacity=capacity)


@pytest.mark.parametrize("policy", ["fenwick", "fixed", "dla"])
def test_config_multi_state_policies_need_two_slots(policy):
    with pytest.raises(ValueError, match=rf"DLAConfig\.capacity must be >= 2 for policy='{policy}'"):
        DLAConfig(policy=policy, capacity=1)
    assert DLAConfig(policy="single", capacity=1).num_slots == 1


@pytest.mark.parametrize("field, value", [
    pytest.param("policy", "loglinear", id="policy-unknown"),
    pytest.param("policy", "DLA", id="policy-wrong-case"),
    pytest.param("score", "drift", id="score-unknown"),
    pytest.param("merge", "newest", id="merge-unknown"),
])
def test_config_unknown_choice_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"DLAConfig\.{field} must be one of \[.*\], got '{value}'"):
        DLAConfig(**{field: value})


@pytest.mark.parametrize("field, value, match", [
    pytest.param("block_size", 0, r"DLAConfig\.block_size must be an integer >= 1", id="block_size=0"),
    pytest.param("block_size", 2.0, r"DLAConfig\.block_size must be an integer >= 1", id="block_size=2.0"),
    pytest.param("eps", 0.0, r"DLAConfig\.eps must be > 0", id="eps=0"),
    pytest.param("eps", -1e-6, r"DLAConfig\.eps must be > 0", id="eps<0"),
    pytest.param("eps", math.nan, r"DLAConfig\.eps must be a finite number", id="eps=nan"),
    pytest.param("threshold", math.nan, r"DLAConfig\.threshold must be a finite number", id="threshold=nan"),
    pytest.param("threshold", math.inf, r"DLAConfig\.threshold must be a finite number", id="threshold=inf"),
    pytest.param("threshold", -math.inf, r"DLAConfig\.threshold must be a finite number", id="threshold=-inf"),
    pytest.param("threshold", "0.6", r"DLAConfig\.threshold must be a finite number", id="threshold-str"),
    pytest.param("threshold", [], r"DLAConfig\.threshold must be .* sequence of finite numbers", id="threshold=[]"),
    pytest.param("threshold", [0.5, math.nan], r"DLAConfig\.threshold must be .*\(one per head\)",
                 id="threshold-nan-head"),
    pytest.param("threshold", [[0.5]], r"DLAConfig\.threshold must be .*\(one per head\)", id="threshold-2d"),
    pytest.param("target_rate", 0.0, r"DLAConfig\.target_rate must be in \(0, 1\) or None", id="target_rate=0"),
    pytest.param("target_rate", 1.0, r"DLAConfig\.target_rate must be in \(0, 1\) or None", id="target_rate=1"),
    pytest.param("target_rate", math.nan, r"DLAConfig\.target_rate must be a finite number", id="target_rate=nan"),
])
def test_config_bad_number_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        DLAConfig(**{field: value})


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown DLAConfig field\(s\) \['capcity', 'tau'\]"):
        DLAConfig.from_dict({"policy": "dla", "capcity": 4, "tau": 0.5})
    with pytest.raises(ValueError, match=r"unknown DLAConfig field\(s\) \['extra'\]"):
        DLAConfig.from_json('{"extra": 1}')
    with pytest.raises(TypeError, match=r"DLAConfig\.from_dict expects a dict, got list"):
        DLAConfig.from_dict([("policy", "dla")])


ROUND_TRIP = [
    DLAConfig(),
    DLAConfig(policy="single"),
    DLAConfig(policy="fenwick", capacity=12),
    DLAConfig(policy="fixed", capacity=4, block_size=6, merge="density"),
    DLAConfig(policy="dla", capacity=8, threshold=0.35, score="state_drift", merge="oldest", eps=1e-8),
    DLAConfig(policy="dla", capacity=8, threshold=(0.3, 0.5), target_rate=None, score="token_drift"),
]


@pytest.mark.parametrize("config", ROUND_TRIP, ids=lambda c: f"{c.policy}-{c.merge}-{c.score}")
def test_config_json_round_trip(config):
    assert DLAConfig.from_json(config.to_json()) == config
    assert DLAConfig.from_dict(config.to_dict()) == config
    assert DLAConfig.from_json(config.to_json()).to_json() == config.to_json()


@pytest.mark.parametrize("policy, merge", [("dla", "density"), ("fixed", "oldest"), ("fenwick", "oldest"),
                                           ("single", "oldest")])
def test_config_default_merge(policy, merge):
    assert DLAConfig(policy=policy).merge == merge
    assert DLAConfig.from_json(f'{{"policy": "{policy}"}}').merge == merge
    other = "oldest" if merge == "density" else "density"
    assert DLAConfig(policy=policy, merge=other).merge == other  # an explicit choice is kept


def test_config_accepts_numpy_numbers_and_sequences():
    config = DLAConfig(capacity=np.int64(4), threshold=np.array([0.5, 0.25], np.float32), target_rate=np.float32(0.25))
    assert config.capacity == 4 and type(config.capacity) is int
    assert config.threshold == (0.5, 0.25) and config.target_rate == 0.25
    np.testing.assert_array_equal(config.thresholds(2), [0.5, 0.25])
    np.testing.assert_array_equal(DLAConfig(threshold=0.5).thresholds(3), [0.5, 0.5, 0.5])
