"""Shared test helpers: inputs, conversions between backends, the fla-style relative error, the chunk path
against the reference, tiny models and the scripts as modules. Test modules import from here, never from
each other; shared fixtures live in conftest.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

import dla_shared
import dla_torch
from dla_shared import DLAConfig, DLAState, decode, inspect
from dla_shared.config import POLICIES  # noqa: F401 (re-exported: the tests' policies are the config's)
from dla_shared.state import canonical
from dla_torch.models import DLAGatedDeltaNetConfig, DLAGatedDeltaNetForCausalLM, DLAMamba2Config, DLAMamba2ForCausalLM

NAMES = ("q", "k", "v", "g", "lam", "beta")
TRANSITIONS = [pytest.param(False, id="diagonal"), pytest.param(True, id="delta")]  # the ``delta`` argument
TOL32 = {"o": 4e-3, "grad": 1e-2}  # relative RMS, float32 (DESIGN section 5)
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


# The compiled decode step (impl="cpu"), built at install where a C compiler is (always in CI).
needs_c = pytest.mark.skipif(not decode.available(), reason="the C step was not built (no C compiler)")


def config_for(policy: str, **overrides) -> DLAConfig:
    """Small caches so that merging is exercised at test lengths; for ``dla`` a threshold at which the
    default score (state_drift) opens states at about a third to two thirds of `make_inputs`' tokens."""
    defaults = {"single": {}, "fenwick": {"capacity": 12}, "fixed": {"capacity": 4, "block_size": 6},
                "dla": {"capacity": 4, "threshold": 0.3}}[policy]
    return DLAConfig(policy=policy, **{**defaults, **overrides})


def make_inputs(config: DLAConfig, B=2, T=37, H=3, Dk=5, Dv=7, delta=False, seed=0, switch=0.15):
    """float64 numpy inputs whose keys and values drift between random segments.

    Each (row, head) switches to a new segment with probability ``switch`` per token, so boundaries
    differ per row and head. Keys are unit norm (the delta rule needs ||k|| <= 1 for stability).
    """
    rng = np.random.default_rng(seed)
    new_segment = rng.random((B, T, H)) < switch
    segment = np.cumsum(new_segment, axis=1)
    protos_k = rng.standard_normal((B, T + 1, H, Dk))
    protos_v = rng.standard_normal((B, T + 1, H, Dv))
    take = lambda protos: np.take_along_axis(protos, segment[..., None], axis=1)
    k = take(protos_k) + 0.3 * rng.standard_normal((B, T, H, Dk))
    v = take(protos_v) + 0.3 * rng.standard_normal((B, T, H, Dv))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    return {
        "q": rng.standard_normal((B, T, H, Dk)),
        "k": k,
        "v": v,
        "g": -0.5 * rng.random((B, T, H)),
        "lam": rng.random((B, T, H, config.num_slots)) + 0.5,
        "beta": rng.random((B, T, H)) if delta else None,
    }


def head_thresholds(H: int, delta: bool) -> tuple[float, ...]:
    """One state_drift threshold per head, rising from head 0 to head H - 1, so that `make_inputs`' heads
    open at clearly different rates (head 0 at most tokens, the last at a few; `assert_rates_differ`)."""
    return tuple(np.linspace(0.2, 0.9 if delta else 0.5, H).tolist())


def assert_rates_differ(config: DLAConfig, x, **kw):
    """The oracle's decisions on inputs ``x``: head 0's open rate (the share of the tokens after each
    sequence's first that open a state) exceeds the last head's by more than 0.3, and the last head opens."""
    trace = inspect(x["q"], x["k"], x["v"], x["g"], x["beta"], config=config, **kw)
    counted = trace.pos > 0  # [B, T]: padding has pos -1
    rates = (trace.opened & counted[..., None]).sum((0, 1)) / counted.sum()
    assert rates[-1] > 0 and rates[0] > rates[-1] + 0.3, f"open rates per head {rates}"


def to_torch(x, dtype=torch.float64, requires_grad=False):
    if x is None:
        return None
    if isinstance(x, dict):
        return {name: to_torch(v, dtype, requires_grad) for name, v in x.items()}
    if isinstance(x, list):
        return [to_torch(v, dtype, requires_grad) for v in x]
    if isinstance(x, DLAState):  # the states (and decay) in ``dtype``, the rest as they are
        return x.map(lambda f, a: to_torch(a, dtype, requires_grad and f == "S") if f in ("S", "ibar", "decay")
                     else torch.tensor(np.asarray(a)))
    return torch.tensor(np.asarray(x), dtype=dtype, requires_grad=requires_grad)


def to_mlx(x, dtype=mx.float64):
    if x is None:
        return None
    if isinstance(x, dict):
        return {name: to_mlx(v, dtype) for name, v in x.items()}
    if isinstance(x, list):
        return [to_mlx(v, dtype) for v in x]
    if isinstance(x, DLAState):
        return x.map(lambda f, a: to_mlx(a, dtype) if f in ("S", "ibar", "decay") else mx.array(np.asarray(a)))
    return mx.array(np.asarray(x), dtype=dtype)


def to_numpy(x):
    if x is None:
        return None
    if isinstance(x, DLAState):  # in the canonical layout, to compare states of every impl
        return canonical(x.map(lambda f, a: to_numpy(a)))
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def scrambled(state: DLAState, seed=0) -> DLAState:
    """The same states in a physical layout (`dla_shared.state`), as numpy arrays: each (sequence, head)'s
    buffers in a random order, each divided by a random decay in [0.5, 2)."""
    state = to_numpy(state)
    rng = np.random.default_rng(seed)
    N, H, L = state.n.shape
    slot = np.argsort(rng.random((N, H, L)), axis=-1)  # slot i's buffer
    decay = rng.uniform(0.5, 2, (N, H)).astype(state.S.dtype)
    S = np.empty_like(state.S)
    np.put_along_axis(S, slot[..., None, None], state.S / decay[..., None, None, None], axis=2)
    return DLAState(S, state.n, state.ibar, state.pos, state.opened, slot=slot, decay=decay)


def rel_err(ref, x) -> float:
    """Relative RMS error, as fla's assert_close: RMS(ref - x) / (RMS(ref) + 1e-12)."""
    ref, x = np.asarray(to_numpy(ref), np.float64), np.asarray(to_numpy(x), np.float64)
    assert ref.shape == x.shape, (ref.shape, x.shape)
    assert np.isfinite(x).all(), "non-finite values"
    return float(np.sqrt(np.mean((ref - x) ** 2)) / (np.sqrt(np.mean(ref**2)) + 1e-12))


def assert_close(name, ref, x, tol):
    err = rel_err(ref, x)
    assert err <= tol, f"{name}: relative RMS error {err:.3e} > {tol:.1e}"


def assert_states_close(ref: DLAState, x: DLAState, tol):
    """Same bookkeeping exactly, states and scores within ``tol``."""
    ref, x = to_numpy(ref), to_numpy(x)
    np.testing.assert_array_equal(ref.n, x.n, err_msg="n")
    np.testing.assert_array_equal(ref.pos, x.pos, err_msg="pos")
    np.testing.assert_array_equal(ref.opened, x.opened, err_msg="opened")
    assert_close("S", ref.S, x.S, tol)
    assert_close("ibar", ref.ibar, x.ibar, tol)


def prefix_state(config, x, t):
    """The oracle's state after the first t tokens, and the remaining inputs."""
    head = {n: None if x[n] is None else x[n][:, :t] for n in NAMES}
    tail = {n: None if x[n] is None else x[n][:, t:] for n in NAMES}
    return dla_shared.dla_attention(*(head[n] for n in NAMES), config=config, output_final_state=True)[1], tail


def run_with_grads(impl, config, x, dtype, state=None, **kw):
    """dla_torch's ``impl``: forward and backward of a fixed random loss on outputs and final states; all
    results as numpy."""
    tx = to_torch(x, dtype, requires_grad=True)
    ts = None if state is None else to_torch(state, dtype, requires_grad=True)
    o, final = dla_torch.dla_attention(*(tx[n] for n in NAMES), config=config, impl=impl, initial_state=ts,
                                       output_final_state=True, **kw)
    rng = torch.Generator().manual_seed(0)
    loss = (o * torch.randn(o.shape, generator=rng, dtype=dtype)).sum() + \
        (final.S * torch.randn(final.S.shape, generator=rng, dtype=dtype)).sum()
    loss.backward()
    grads = {f"d{n}": tx[n].grad for n in NAMES if tx[n] is not None}
    if ts is not None:
        grads["dS0"] = ts.S.grad
    return to_numpy(o), to_numpy(final), {n: to_numpy(v) for n, v in grads.items()}


def compare(config, x, dtype=torch.float64, state=None, impl="chunk", **kw):
    """dla_torch's ``impl`` vs its reference: outputs, final states and every gradient."""
    o, final, grads = run_with_grads("reference", config, x, dtype, state, **kw)
    o2, final2, grads2 = run_with_grads(impl, config, x, dtype, state, **kw)
    if dtype == torch.float64:
        tol = {"o": 1e-10, "grad": 1e-9}
    else:
        tol = TOL32
    assert_close("o", o, o2, tol["o"])
    assert_states_close(final, final2, tol["o"])
    assert grads.keys() == grads2.keys()
    for name in grads:
        assert_close(name, grads[name], grads2[name], tol["grad"])


WORDS = "the cache opens a new state where the text changes and merges the pair of least density".split()


def make_tokenizer(folder, docs, vocab_size=300):
    """A byte-level BPE tokenizer trained on ``docs``, saved as tokenizer.json and tokenizer_config.json."""
    import json
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    Path(folder).mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(Path(folder, "tokenizer.json")))
    Path(folder, "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}))
    return tokenizer


def load_script(name):
    """A script of ``scripts/`` as a module (registered in sys.modules, so that its functions pickle for
    subprocesses)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# The tiny models' caches, per policy.
POLICY_CONFIGS = {"single": DLAConfig(policy="single"), "fenwick": DLAConfig(policy="fenwick", capacity=8),
                  "fixed": DLAConfig(policy="fixed", capacity=3, block_size=5),
                  "dla": DLAConfig(policy="dla", capacity=4)}


def tiny(kind, policy="dla", vocab_size=61, dla=None, perturb=True, **kw):
    """A small random torch model, every parameter perturbed so that each matters (a new model's read weights
    are all 1, which would hide the slots) unless ``perturb`` is False. ``dla`` replaces the policy's config."""
    torch.manual_seed(0)
    dla = dla or POLICY_CONFIGS[policy]
    if kind == "mamba2":
        config = DLAMamba2Config(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16,
                                 state_size=8, n_groups=2, dla=dla, **kw)
        model = DLAMamba2ForCausalLM(config)
    else:
        config = DLAGatedDeltaNetConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_heads=2,
                                        head_dim=8, dla=dla, **kw)
        model = DLAGatedDeltaNetForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters() if perturb else ():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()
