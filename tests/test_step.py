"""The decode steps against their backend's reference: ``step`` (decisions on the device; `dla_mlx.ops.step`,
`dla_torch.ops.step`) and ``cpu`` (the same step compiled in C, `dla_shared.decode`): the same decisions and
bookkeeping exactly, outputs and states within rounding, every policy, both transitions, with merges active,
padding, and continuation from a prefilled state; for torch's step also every gradient. And which one
``auto`` takes."""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch

import dla_mlx
import dla_torch
from dla_mlx.ops import attention as mlx_attention
from dla_shared import decode
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
    needs_c,
    prefix_state,
    to_mlx,
    to_numpy,
    to_torch,
)

BACKENDS = {
    "mlx": SimpleNamespace(attention=dla_mlx.dla_attention, impls=mlx_attention.IMPLS, array=to_mlx,
                           dtypes={"float64": mx.float64, "float32": mx.float32}, mask=mx.array,
                           cat=lambda xs: mx.concatenate(xs, axis=1),
                           widen=lambda a, n: mx.broadcast_to(a, (n, *a.shape[1:]))),
    "torch": SimpleNamespace(attention=dla_torch.dla_attention, impls=torch_attention.IMPLS, array=to_torch,
                             dtypes={"float64": torch.float64, "float32": torch.float32}, mask=torch.tensor,
                             cat=lambda xs: torch.cat(xs, dim=1), widen=lambda a, n: a.expand(n, *a.shape[1:])),
}
TOLS = {"float64": 1e-12, "float32": 1e-5}
STEPS = ["step", pytest.param("cpu", marks=needs_c)]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return BACKENDS[request.param]


def tolerance(backend, impl, dtype):
    """TOLS, but 1e-7 between MLX's float64 reference and the C step: mlx's exp is float32-accurate even on
    float64 arrays (tests/test_references.py), while the C step takes a float64 exp (as torch and numpy do)."""
    return 1e-7 if backend is BACKENDS["mlx"] and impl == "cpu" and dtype == "float64" else TOLS[dtype]


def padded(B, T):
    mask = np.ones((B, T), bool)
    mask[1, :3] = False
    mask[1, 17:20] = False
    return mask


def assert_same_run(ref, step, tol):
    (o, state), (o2, state2) = ref, step
    assert_close("o", to_numpy(o), to_numpy(o2), tol)
    assert_states_close(state, state2, tol)  # the decisions (n, pos, opened) exactly


@pytest.mark.parametrize("impl", STEPS)
@pytest.mark.parametrize("dtype", TOLS)
@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_step_equals_the_reference(backend, policy, delta, dtype, impl):
    config = config_for(policy)
    x = make_inputs(config, 2, 40, 3, 5, 7, delta=delta, seed=3)
    inputs = [backend.array(x[n], backend.dtypes[dtype]) for n in NAMES]
    run = lambda impl: backend.attention(*inputs, config=config, mask=backend.mask(padded(2, 40)), impl=impl,
                                         output_final_state=True)
    ref = run("reference")
    if policy != "single":  # more states opened than the cache holds: merges happened
        assert int(ref[1].opened.max()) > config.num_slots
    assert (to_numpy(ref[1].ibar) != 0).any() == config.scored  # no score where no decision reads one
    assert_same_run(ref, run(impl), tolerance(backend, impl, dtype))


@pytest.mark.parametrize("impl", STEPS)
@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_decoding_after_a_chunk_prefill_equals_the_reference(backend, policy, delta, impl):
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
                                     impl=impl, output_final_state=True)
        outputs.append(o)
    assert_same_run(ref, (backend.cat(outputs), state), tolerance(backend, impl, "float64"))


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", ["fenwick", "dla"])
def test_torch_step_gradients_equal_the_reference(policy, delta):
    """float64, from a cache that holds states, with padding: outputs, final states and every gradient."""
    config = config_for(policy)
    x = make_inputs(config, 2, 20 + 30, 2, 5, 7, delta=delta, seed=6)
    state, tail = prefix_state(config, x, 20)
    compare(config, tail, torch.float64, state=state, impl="step", mask=torch.tensor(padded(2, 30)))


def count_calls(monkeypatch, impls):
    """Replace ``impls``' "step", "cpu" (and "metal") by counting wrappers; return the list of (impl, shape)
    calls."""
    calls = []
    for name in set(impls) & {"step", "cpu", "metal"}:
        def counted(*args, name=name, run=impls[name], **kw):
            calls.append((name, tuple(args[0].shape)))
            return run(*args, **kw)
        monkeypatch.setitem(impls, name, counted)
    return calls


@pytest.mark.parametrize("built", [pytest.param(True, marks=needs_c), False], ids=["built", "not-built"])
def test_auto_decodes_with_a_step(backend, built, monkeypatch):
    """One token: ``cpu`` where it was built (on the CPU, no gradient), else ``step``; more: the chunk path. With
    Metal, MLX takes the Metal kernels for both."""
    if not built:
        monkeypatch.setattr(decode, "_decode", None)
    calls = count_calls(monkeypatch, backend.impls)
    config = config_for("dla")
    x = make_inputs(config, 1, 3, 2, 4, 4, seed=1)
    inputs = [backend.array(x[n], backend.dtypes["float32"]) for n in NAMES]
    backend.attention(*(a[:, :1] for a in inputs if a is not None), None, config=config)
    backend.attention(*(a for a in inputs if a is not None), None, config=config)
    if backend.attention is dla_mlx.dla_attention and mx.metal.is_available():
        assert calls == [("metal", (1, 1, 2, 4)), ("metal", (1, 3, 2, 4))]
    else:
        assert calls == [("cpu" if built else "step", (1, 1, 2, 4))]  # one token: a step; three: chunk


def test_torch_auto_decodes_with_the_differentiable_step_when_gradients_are_needed(monkeypatch):
    calls = count_calls(monkeypatch, torch_attention.IMPLS)
    config = config_for("dla")
    x = to_torch(make_inputs(config, 1, 1, 2, 4, 4, seed=1), torch.float32, requires_grad=True)
    o, _ = dla_torch.dla_attention(*(x[n] for n in NAMES), config=config)
    o.sum().backward()
    assert calls == [("step", (1, 1, 2, 4))] and x["q"].grad is not None


@pytest.mark.parametrize("namespace", ["torch", "mlx-cpu"])
@pytest.mark.parametrize("case", ["threshold", "density"])
def test_plan_compares_in_float64_as_numpy(case, namespace):
    """float32 scores and ibar: numpy compares a score with the threshold, and divides the pair sums, in float64;
    so must the steps' plan (torch's, and MLX's on the CPU). A score of float32(0.7) is below 0.7; the pair
    densities 1.0 / 3 and float32(2/3) / 2 tie in float32 but not in float64 (then the newer pair merges)."""
    from dla_mlx.ops.step import Exact
    from dla_shared import policy
    from dla_torch.ops.step import Torch

    array, xp = (torch.tensor, Torch(torch.device("cpu"))) if namespace == "torch" else (mx.array, Exact())

    if case == "threshold":
        config = config_for("dla", capacity=4, threshold=0.7)
        n, ibar = [[[3, 2, 0, 0]]], [[[0.5, 0.5, 0, 0]]]
    else:
        config = config_for("dla", capacity=4, threshold=0.5)
        n, ibar = [[[2, 1, 1, 1]]], [[[0.5, 0.5, 0.16666669, 1.0]]]
    inputs = (np.array(n), np.array(ibar, np.float32), np.array([5]), np.array([[0.7]], np.float32), np.array([True]))
    want = policy.plan(config, *inputs)
    got = policy.plan(config, *map(array, inputs), xp=xp)
    assert want.opened.tolist() == got.opened.tolist() and want.merge_slot.tolist() == got.merge_slot.tolist()
    assert want.opened.tolist() == [[case == "density"]]  # the cases are the ties they are meant to be
    if case == "density":
        assert want.merge_slot.tolist() == [[1]]


@needs_c
def test_the_compiled_step_checks_its_array_shapes():
    """`dla_shared.decode` refuses what its C loop would read out of bounds, naming the argument."""
    config = config_for("dla")
    L = config.num_slots
    S = np.zeros((1, 2, L, 3, 4), np.float32)
    args = dict(q=np.zeros((1, 5, 2, 3)), k=np.zeros((1, 5, 2, 3)), v=np.zeros((1, 5, 2, 4)), g=np.zeros((1, 5, 2)),
                lam=np.ones((1, 5, 2, L)), beta=None, active=np.ones((1, 5), bool), S=S,
                n=np.zeros((1, 2, L), np.int64), ibar=np.zeros((1, 2, L), np.float32), pos=np.zeros(1, np.int64),
                opened=np.zeros((1, 2), np.int64))
    o, *_ = decode.decode(config, 1.0, **args)
    assert o.shape == (1, 5, 2, 4)
    with pytest.raises(ValueError, match=r"lam must have shape \[1, 5, 2, %d\]" % L):
        decode.decode(config, 1.0, **(args | {"lam": np.ones((1, 5, 2, L - 1))}))


@pytest.mark.parametrize("impl", STEPS)
def test_step_leaves_its_initial_state_as_it_was(backend, impl):
    """The C step updates a copy of the states in place, never the caller's."""
    config = config_for("dla")
    x = backend.array(make_inputs(config, 2, 12, 3, 5, 7, seed=4))
    _, state = backend.attention(*(None if x[n] is None else x[n][:, :11] for n in NAMES), config=config,
                                 impl="chunk", output_final_state=True)
    before = {f: to_numpy(getattr(state, f)).copy() for f in ("S", "n", "ibar", "pos", "opened")}
    _, after = backend.attention(*(None if x[n] is None else x[n][:, 11:] for n in NAMES), config=config,
                                 initial_state=state, impl=impl, output_final_state=True)
    for f, want in before.items():
        np.testing.assert_array_equal(to_numpy(getattr(state, f)), want, err_msg=f)
    assert not np.array_equal(to_numpy(after.S), before["S"])


@pytest.mark.parametrize("impl", STEPS)
def test_step_takes_a_state_that_is_a_broadcast_view(backend, impl):
    """One row's state broadcast to two rows (stride 0, not contiguous) decodes as the reference does."""
    config = config_for("dla")
    x = backend.array(make_inputs(config, 2, 12, 3, 5, 7, seed=4))
    _, one = backend.attention(*(None if x[n] is None else x[n][:1, :11] for n in NAMES), config=config,
                               impl="chunk", output_final_state=True)
    wide = one.map(lambda f, a: backend.widen(a, 2))
    run = lambda impl: backend.attention(*(None if x[n] is None else x[n][:, 11:] for n in NAMES), config=config,
                                         initial_state=wide, impl=impl, output_final_state=True)
    assert_same_run(run("reference"), run(impl), TOLS["float32"])


@needs_c
def test_the_compiled_step_in_place_writes_into_s():
    """The wrapper's ``inplace``: the states come back in S itself, as the copying call returns them, and a
    read-only S is refused. (The in-place order of the C loop is what every equality test above checks.)"""
    config = config_for("dla")
    x = make_inputs(config, 2, 6, 3, 5, 7, seed=2)
    L = config.num_slots
    rng = np.random.default_rng(0)
    S = rng.standard_normal((2, 3, L, 5, 7))
    books = dict(n=np.full((2, 3, L), 2, np.int64), ibar=rng.random((2, 3, L)), pos=np.full(2, 2 * L, np.int64),
                 opened=np.zeros((2, 3), np.int64))
    args = [x[n] for n in NAMES]
    o, S_new, *rest = decode.decode(config, 0.5, *args, np.ones((2, 6), bool), S, **books)
    own = S.copy()
    o2, S_own, *rest2 = decode.decode(config, 0.5, *args, np.ones((2, 6), bool), own, **books, inplace=True)
    assert S_own is own and S_new is not S
    for a, b in zip((o, S_new, *rest), (o2, own, *rest2)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="inplace=True needs S C-contiguous and writable"):
        own.flags.writeable = False
        decode.decode(config, 0.5, *args, np.ones((2, 6), bool), own, **books, inplace=True)


EMPTY_BATCH = [pytest.param(backend, impl, T, id=f"{backend}-{impl}-T{T}", marks=[needs_c] if impl == "cpu" else [])
               for backend in ("torch", "mlx") for impl in ("reference", "step", "cpu", "chunk") for T in (1, 3)]


@pytest.mark.parametrize("backend, impl, T", EMPTY_BATCH)
def test_an_empty_batch_gives_empty_outputs_and_state(backend, impl, T):
    """No sequences (B = 0): every impl returns o [0, T, H, Dv] and a state of no rows (the chunk paths, which
    reduce over rows, once failed on it)."""
    config = config_for("dla")
    x = make_inputs(config, 1, T, 2, 4, 5, seed=1)
    attention, array = {"torch": (dla_torch.dla_attention, to_torch), "mlx": (dla_mlx.dla_attention, to_mlx)}[backend]
    o, state = attention(*(None if x[n] is None else array(x[n][:0]) for n in NAMES), config=config, impl=impl,
                         output_final_state=True)
    assert tuple(o.shape) == (0, T, 2, 5) and tuple(state.S.shape) == (0, 2, config.num_slots, 4, 5)


def test_cpu_refuses_what_it_cannot_do(monkeypatch):
    config = config_for("dla")
    x = to_torch(make_inputs(config, 1, 1, 2, 4, 4, seed=1), torch.float32, requires_grad=True)
    with pytest.raises(ValueError, match="impl='cpu' computes no gradients; use impl='step'"):
        dla_torch.dla_attention(*(x[n] for n in NAMES), config=config, impl="cpu")
    monkeypatch.setattr(decode, "_decode", None)
    for attention, array in ((dla_torch.dla_attention, to_torch), (dla_mlx.dla_attention, to_mlx)):
        with pytest.raises(ValueError, match="impl='cpu' needs the compiled step .* use impl='step'"):
            attention(*(None if x[n] is None else array(x[n].detach().numpy()) for n in NAMES), config=config,
                      impl="cpu")


@pytest.mark.parametrize("impl", STEPS)
def test_step_refuses_an_overflowing_fenwick_cache_as_the_reference_does(backend, impl):
    config = config_for("fenwick", capacity=3)  # 3 levels hold 4 tokens
    x = make_inputs(config, 1, 6, 2, 4, 4, seed=1)
    inputs = [backend.array(x[n]) for n in NAMES]
    errors = []
    for run in ("reference", impl):
        with pytest.raises(ValueError, match="holds at most 4 tokens") as error:
            backend.attention(*inputs, config=config, impl=run)
        errors.append(str(error.value))
    assert errors[0] == errors[1]
