"""The Metal kernels against their ops paths (DESIGN section 5), launched exactly as `dla_mlx.ops.metal.run`
launches them: through the CPU emulation harness everywhere (`tests/metal_emu`), on the GPU where Metal exists.

``dla_scan`` against `dla_shared.scan` (decisions and open counts exact), ``dla_decode`` against the MLX
reference for one token, and ``impl="metal"`` end to end (decode, prefill, then decode) against the reference.
``dla`` runs with a threshold per head under which the heads open at clearly different rates.
"""

import re

import mlx.core as mx
import numpy as np
import pytest

import dla_mlx
from dla_mlx.ops import metal
from dla_mlx.ops.attention import empty_state
from dla_shared import DLAState, policy
from dla_shared.config import MERGES, SCORES
from dla_shared.scan import scan_numpy as shared_scan  # the loop the kernels mirror

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
    scrambled,
    to_mlx,
)
from metal_emu.harness import emulate, translate

LAUNCHERS = [pytest.param(emulate, id="emulated"),
             pytest.param(metal.run, id="metal", marks=pytest.mark.skipif(not mx.metal.is_available(),
                                                                           reason="needs a Metal GPU"))]
# (policy, overrides): dla's threshold is one per head (`head_thresholds`) unless the overrides set one.
CONFIGS = {"single": ("single", {}), "fenwick": ("fenwick", {}), "fixed": ("fixed", {}), "dla": ("dla", {}),
           "dla-oldest": ("dla", {"merge": "oldest"}),
           "dla-token_drift": ("dla", {"score": "token_drift", "threshold": 0.6}),  # the paper's reading
           "fixed-density": ("fixed", {"merge": "density"})}
# Dv = 40: two simdgroups, the second partly idle; odd Dk; a chunk of 16 so that 70 tokens span five.
SHAPE = {"B": 2, "H": 2, "Dk": 9, "Dv": 40}
CHUNK = 16


def make_config(name, delta):
    policy, overrides = CONFIGS[name]
    per_head = {"threshold": head_thresholds(SHAPE["H"], delta)} if policy == "dla" else {}
    return config_for(policy, **{**per_head, **overrides})


@pytest.fixture(params=LAUNCHERS)
def launcher(request):
    return request.param


def scan_case(config, delta, T, prefix=11):
    """Inputs of a scan (`dla_shared.scan`'s arguments): row 0 continues from the oracle's state after
    ``prefix`` tokens, row 1 starts empty and ends in padding."""
    x = make_inputs(config, T=prefix + T, delta=delta, **SHAPE)
    state, tail = prefix_state(config, x, prefix)
    for field in DLAState.FIELDS:
        getattr(state, field)[1] = 0
    active = np.ones((SHAPE["B"], T), bool)
    active[1, T - T // 3 :] = False
    f32 = lambda a: None if a is None else np.asarray(a, np.float32)
    return [f32(tail[n]) for n in ("k", "v", "g", "beta")] + [active, f32(state.S[:, :, 0]), state.n,
                                                               f32(state.ibar), state.pos, state.opened]


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("T", [1, 70], ids=lambda T: f"T{T}")
def test_scan_kernel(launcher, name, delta, T):
    config = make_config(name, delta)
    args = scan_case(config, delta, T)
    sigma, (n, ibar, _, opened) = shared_scan(config, *args, CHUNK)
    m = lambda a: None if a is None else mx.array(a)
    sigma2, n2, ibar2, opened2 = launcher(metal.scan_launch(config, *map(m, args), CHUNK))
    np.testing.assert_array_equal(np.array(sigma2), sigma)
    np.testing.assert_array_equal(np.array(n2), n)
    np.testing.assert_array_equal(np.array(opened2), opened)
    np.testing.assert_allclose(np.array(ibar2), ibar, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["canonical", "physical"])
@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("name", CONFIGS)
def test_decode_kernel(launcher, name, delta, layout):
    """The kernel reads a state in either layout (`dla_shared.state`) and writes the canonical one."""
    config = make_config(name, delta)
    x = make_inputs(config, T=30, delta=delta, **SHAPE)
    state, tail = prefix_state(config, x, 29)
    state = to_mlx(state if layout == "canonical" else scrambled(state), mx.float32)
    args = [to_mlx(tail[n], mx.float32) for n in NAMES]
    mask = mx.array([[True], [False]])  # row 1: a padded step changes nothing
    o, final = dla_mlx.dla_attention(*args, config=config, scale=0.7, mask=mask, initial_state=state,
                                     output_final_state=True, impl="reference")
    q, k, v, g, lam, beta = (None if a is None else a[:, 0] for a in args)
    o2, S2, n2, ibar2, opened2 = launcher(metal.decode_launch(config, q, k, v, g, lam, beta, mask[:, 0], state, 0.7))
    assert_close("o", o[:, 0], o2, 1e-5)
    assert_close("S", final.S, S2, 1e-5)
    np.testing.assert_array_equal(np.array(n2), np.array(final.n))
    np.testing.assert_array_equal(np.array(opened2), np.array(final.opened))
    np.testing.assert_allclose(np.array(ibar2), np.array(final.ibar), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_metal_impl_decode_prefill_decode(launcher, monkeypatch, policy, delta):
    """impl="metal" (the decode kernel for the first token, the scan kernel in a 36-token prefill, then the
    decode kernel token by token) equals the reference over the whole sequence: outputs and final state,
    open counts included."""
    monkeypatch.setattr(metal, "run", launcher)
    config = make_config(policy, delta)
    x = make_inputs(config, T=45, delta=delta, **SHAPE)
    if policy == "dla":
        assert_rates_differ(config, x)
    x = {n: to_mlx(a, mx.float32) for n, a in x.items()}
    o, final = dla_mlx.dla_attention(*(x[n] for n in NAMES), config=config, output_final_state=True,
                                     impl="reference")
    part = lambda s, e: [None if x[n] is None else x[n][:, s:e] for n in NAMES]
    outputs, state = [], None
    for s, e in [(0, 1), (1, 37), *((t, t + 1) for t in range(37, 45))]:
        o2, state = dla_mlx.dla_attention(*part(s, e), config=config, initial_state=state, output_final_state=True,
                                          impl="metal")
        outputs.append(o2)
    assert_close("o", o, mx.concatenate(outputs, axis=1), 1e-5)
    assert_states_close(final, state, 1e-5)


def test_metal_impl_refuses_float64_and_small_fenwick():
    config = config_for("fenwick", capacity=3)  # 3 levels hold 4 tokens
    x = {n: to_mlx(a, mx.float32) for n, a in make_inputs(config, T=6, **SHAPE).items()}
    with pytest.raises(ValueError, match="capacity=3 levels holds at most 4 tokens"):
        dla_mlx.dla_attention(*(x[n] for n in NAMES), config=config, impl="metal")
    x64 = {n: None if a is None else a.astype(mx.float64) for n, a in x.items()}
    with pytest.raises(ValueError, match="float64"):
        dla_mlx.dla_attention(*(x64[n] for n in NAMES), config=config, impl="metal")


# Deliberate bugs that the harness must catch: a missing barrier (threadgroup memory read before the other
# simdgroups wrote it, or overwritten before all read it) and a wrong index.
BUGS = {
    "missing-barrier": lambda header, body: (header.replace("threadgroup_barrier(mem_flags::mem_threadgroup);", "", 1),
                                             body),
    "wrong-index": lambda header, body: (header, body.replace("x[r] = col ? X_in[(bh * Dk + r) * Dv + j]",
                                                              "x[r] = col ? X_in[(bh * Dk + r) * Dv + j / 2]")),
    "one-threshold": lambda header, body: (header, body.replace("threshold[h]", "threshold[0]")),
}


@pytest.mark.parametrize("bug", BUGS)
def test_harness_catches_a_broken_kernel(bug):
    config = make_config("dla", True)
    args = scan_case(config, True, 70)
    m = lambda a: None if a is None else mx.array(a)
    launch = metal.scan_launch(config, *map(m, args), CHUNK)
    sigma, (n, ibar, _, _) = shared_scan(config, *args, CHUNK)
    before = [BUGS[bug](h, b) != (h, b) for h, b in [(metal.source(metal.HEADER), metal.source("dla_scan.metal"))]]
    assert before == [True], "the edit must change the kernel"
    sigma2, n2, ibar2, _ = emulate(launch, edit=BUGS[bug])
    same = (np.array_equal(np.array(sigma2), sigma) and np.array_equal(np.array(n2), n)
            and np.allclose(np.array(ibar2), ibar, rtol=1e-5, atol=1e-6))
    assert not same, f"the harness ran a kernel with a {bug} and did not notice"


def test_harness_refuses_what_it_cannot_emulate():
    config = config_for("dla")
    launch = metal.decode_launch(config, *[mx.zeros((1, 1, 4))] * 3, mx.zeros((1, 1)), mx.ones((1, 1, 4)), None,
                                 mx.array([True]), empty_state(1, 1, 4, 4, 4), 1.0)
    with pytest.raises(NotImplementedError, match="quadgroup"):
        translate(launch, "", "uint q = quadgroup_index_in_threadgroup;")


def test_the_headers_enums_are_the_policy_table():
    """dla_common.h's enums repeat `dla_shared.policy`'s kernel ids (the Triton kernels read the table itself),
    and the table names every choice of the config."""
    enums = " ".join(re.findall(r"enum \{([^}]*)\}", metal.source(metal.HEADER)))
    header = {}
    for kind, name, value in re.findall(r"\b(POLICY|MERGE|SCORE)_(\w+) = (\d+)", enums):
        header.setdefault(kind, {})[name.lower()] = int(value)
    assert header == {"POLICY": policy.POLICY_IDS, "MERGE": policy.MERGE_IDS, "SCORE": policy.SCORE_IDS}
    assert (set(policy.POLICY_IDS), set(policy.MERGE_IDS), set(policy.SCORE_IDS)) == \
        (set(POLICIES), set(MERGES), set(SCORES))
