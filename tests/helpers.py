"""Shared test helpers: inputs, conversions between backends, and the fla-style relative error."""

from __future__ import annotations

import importlib.util
import os

import mlx.core as mx
import numpy as np
import torch

from dla_shared import DLAConfig, DLAState, inspect

NAMES = ("q", "k", "v", "g", "lam", "beta")
POLICIES = ("single", "fenwick", "fixed", "dla")


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
    if isinstance(x, DLAState):
        return DLAState(to_torch(x.S, dtype, requires_grad), torch.tensor(np.asarray(x.n)),
                        to_torch(x.ibar, dtype), torch.tensor(np.asarray(x.pos)), torch.tensor(np.asarray(x.opened)))
    return torch.tensor(np.asarray(x), dtype=dtype, requires_grad=requires_grad)


def to_mlx(x, dtype=mx.float64):
    if x is None:
        return None
    if isinstance(x, dict):
        return {name: to_mlx(v, dtype) for name, v in x.items()}
    if isinstance(x, list):
        return [to_mlx(v, dtype) for v in x]
    if isinstance(x, DLAState):
        return DLAState(to_mlx(x.S, dtype), mx.array(np.asarray(x.n)), to_mlx(x.ibar, dtype),
                        mx.array(np.asarray(x.pos)), mx.array(np.asarray(x.opened)))
    return mx.array(np.asarray(x), dtype=dtype)


def to_numpy(x):
    if x is None:
        return None
    if isinstance(x, DLAState):
        return DLAState(*(to_numpy(getattr(x, f)) for f in DLAState.FIELDS))
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


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


def load_fla_naive():
    """fla's naive log-linear module, loaded by file path: the package __init__ needs a GPU stack."""
    spec = importlib.util.find_spec("fla")
    path = os.path.join(os.path.dirname(spec.origin), "ops", "log_linear_attn", "naive.py")
    module_spec = importlib.util.spec_from_file_location("fla_log_linear_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


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
