"""Every DLA layer's thresholds ``tau`` [H]: a float32 buffer (torch) or frozen array (MLX) in the weights that
the layer's op uses, one per head; saved, loaded, converted, quantized and upcycled with the model; filled from
the config for checkpoints made before it; and, in training, the boundaries each forward opened."""

import dataclasses
import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from safetensors.torch import load_file, save_file

import dla_torch.models.base as torch_base
from dla_mlx.convert import load_model, mlx_to_torch, torch_to_mlx
from dla_shared import DLAConfig, inspect
from dla_shared import dla_attention as oracle
from dla_torch.models import from_pretrained, save_pretrained
from dla_torch.models.base import dla_mixers
from dla_torch.models.upcycle import upcycle

from helpers import tiny, to_numpy

KINDS = ["mamba2", "gdn"]
# One threshold per head of `tiny`'s models, at which their heads open at clearly different rates.
HEAD_TAUS = {"mamba2": (0.02, 0.1, 0.3, 1.0), "gdn": (0.3, 1.0)}
PREFIX = {"mamba2": "backbone.layers.{i}.mixer", "gdn": "model.layers.{i}.attn"}


def per_head(kind, **kw):
    """`tiny`'s model whose every layer holds HEAD_TAUS[kind] (as a trained or calibrated model would)."""
    model = tiny(kind, **kw)
    for mixer in dla_mixers(model):
        mixer.tau.copy_(torch.tensor(HEAD_TAUS[kind]))
    return model


def ids(T=48, B=2, seed=1):
    return torch.randint(0, 61, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw).logits


@pytest.fixture
def recorded(monkeypatch):
    """Every DLA op call of the torch models, its arguments appended (in layer order) to the returned list."""
    calls, op = [], torch_base.dla_attention

    def record(q, k, v, g, lam, beta=None, **kw):
        calls.append({"q": q, "k": k, "v": v, "g": g, "beta": beta, **kw})
        return op(q, k, v, g, lam, beta, **kw)

    monkeypatch.setattr(torch_base, "dla_attention", record)
    return calls


def oracle_boundaries(call):
    """The oracle's boundaries for one recorded op call: opened [H] and tokens (each sequence's first excluded)."""
    trace = inspect(*(to_numpy(call[n]) for n in ("q", "k", "v", "g", "beta")), config=call["config"],
                    mask=to_numpy(call.get("mask")), cu_seqlens=to_numpy(call.get("cu_seqlens")))
    counted = trace.pos > 0
    return (trace.opened & counted[..., None]).sum((0, 1)), counted.sum()


# -- the buffer ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_tau_is_a_float32_buffer_that_starts_at_the_config(kind):
    model = tiny(kind, dla=DLAConfig(policy="dla", capacity=4, threshold=HEAD_TAUS[kind]))
    names = [PREFIX[kind].format(i=i) + ".tau" for i in range(2)]
    state, params = model.state_dict(), dict(model.named_parameters())
    for name in names:
        assert name in state and name not in params
        assert state[name].dtype == torch.float32 and not state[name].requires_grad
        torch.testing.assert_close(state[name], torch.tensor(HEAD_TAUS[kind]), rtol=0, atol=0)
    model.to(torch.bfloat16)  # the weights are cast, the thresholds kept exactly
    assert model.lm_head.weight.dtype == torch.bfloat16
    for mixer in dla_mixers(model):
        torch.testing.assert_close(mixer.tau, torch.tensor(HEAD_TAUS[kind]), rtol=0, atol=0)


def test_a_threshold_per_head_must_have_one_value_per_head():
    with pytest.raises(ValueError, match=r"DLAConfig.threshold has 3 values, one per head, but the input has H = 2"):
        tiny("gdn", dla=DLAConfig(policy="dla", capacity=4, threshold=(0.1, 0.2, 0.3)))


def oracle_logits(model, x, monkeypatch, threshold):
    """The model's logits with the oracle in place of its op, run with ``threshold`` whatever the model passes."""
    config = dataclasses.replace(model.config.dla, threshold=threshold)

    def run_oracle(*inputs, config=config, **kw):
        o, _ = oracle(*map(to_numpy, inputs), config=config, **{k: to_numpy(v) for k, v in kw.items()})
        return torch.from_numpy(o).float(), None

    monkeypatch.setattr(torch_base, "dla_attention",
                        lambda *inputs, config, check_decay, donate_state, **kw: run_oracle(*inputs, **kw))
    return logits(model, x)


@pytest.mark.parametrize("kind", KINDS)
def test_the_op_runs_with_each_heads_tau(kind, monkeypatch):
    """The model's logits are the oracle's with HEAD_TAUS per head, and not with the config's 0.6."""
    model = per_head(kind)
    x = ids()
    expected = logits(model, x)
    torch.testing.assert_close(oracle_logits(model, x, monkeypatch, HEAD_TAUS[kind]), expected, rtol=1e-4, atol=1e-4)
    assert (oracle_logits(model, x, monkeypatch, 0.6) - expected).abs().max() > 1e-3  # the thresholds matter here


def test_the_op_config_follows_tau_however_it_changes(tmp_path):
    """The op's config is read from ``tau`` once and kept (no read per token); it follows an in-place change,
    a loaded state dict and a replaced tensor."""
    mixer = dla_mixers(tiny("gdn"))[0]
    assert mixer.op_config() is mixer.op_config()
    mixer.tau.copy_(torch.tensor([0.3, 1.0]))
    assert mixer.op_config().threshold == pytest.approx((0.3, 1.0))
    mixer.load_state_dict({**mixer.state_dict(), "tau": torch.tensor([0.5, 0.25])})
    assert mixer.op_config().threshold == pytest.approx((0.5, 0.25))
    mixer.tau = torch.tensor([2.0, 4.0])
    assert mixer.op_config().threshold == (2.0, 4.0)


# -- boundaries in training ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layout, checkpointing", [("packed", False), ("packed", True), ("left-padded", False)],
                         ids=["packed", "packed-activation-checkpointing", "left-padded"])
@pytest.mark.parametrize("kind", KINDS)
def test_training_forward_records_the_oracles_boundaries(kind, layout, checkpointing, recorded):
    """Each layer's boundaries per head are the oracle's on that layer's inputs; a document's first token
    and padding are not counted (two documents of 17 and 43 tokens: 58 tokens either way)."""
    model = per_head(kind).train()
    model.activation_checkpointing = checkpointing
    if layout == "packed":
        kw = {"cu_seqlens": torch.tensor([0, 17, 60])}
        x = ids(T=60, B=1)
    else:
        x = ids(T=43)
        kw = {"mask": torch.arange(43) >= torch.tensor([[26], [0]])}
    model(x, **kw).logits.sum().backward()
    assert len(recorded) == (4 if checkpointing else 2)  # the recompute runs each layer's op again
    for mixer, call in zip(dla_mixers(model), recorded):
        opened, tokens = mixer.boundaries
        assert opened.dtype == tokens.dtype == torch.int64 and opened.shape == (len(HEAD_TAUS[kind]),)
        expected_opened, expected_tokens = oracle_boundaries(call)
        assert tokens.item() == expected_tokens == 58
        np.testing.assert_array_equal(opened.numpy(), expected_opened)
        assert opened[0] > opened[-1] + 0.3 * tokens  # the heads' thresholds give them different rates


@pytest.mark.parametrize("kind", KINDS)
def test_boundaries_count_only_the_tokens_of_the_call(kind):
    """With a cache that continues the sequences, a call records only its own tokens: two calls add up to one."""
    model = per_head(kind).train()
    x = ids(T=50)
    with torch.no_grad():
        model(x)
        whole = [m.boundaries for m in dla_mixers(model)]
        cache = model.make_cache()
        model(x[:, :21], cache=cache)
        first = [m.boundaries for m in dla_mixers(model)]
        model(x[:, 21:], cache=cache)
        second = [m.boundaries for m in dla_mixers(model)]
    for (o, t), (o1, t1), (o2, t2) in zip(whole, first, second):
        assert (t1.item(), t2.item(), t.item()) == (2 * 20, 2 * 29, 2 * 49)
        torch.testing.assert_close(o1 + o2, o, rtol=0, atol=0)
    model.eval()  # outside training nothing is recorded
    logits(model, x[:, :5])
    assert all(m.boundaries is b for m, b in zip(dla_mixers(model), second))


# -- checkpoints --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_save_then_load_keeps_tau(kind, dtype, tmp_path):
    model = per_head(kind).to(dtype)
    save_pretrained(model, tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert saved[PREFIX[kind].format(i=1) + ".tau"].dtype == torch.float32
    loaded = from_pretrained(tmp_path, dtype=dtype)
    for a, b in zip(dla_mixers(model), dla_mixers(loaded)):
        torch.testing.assert_close(b.tau, a.tau, rtol=0, atol=0)
    x = ids()
    assert torch.equal(logits(loaded, x), logits(model, x))


def without_tau(model, folder, threshold):
    """Save ``model`` as a checkpoint made before the thresholds: no ``tau``, ``threshold`` in its config."""
    save_pretrained(model, folder)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.endswith(".tau")}, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["dla"]["threshold"] = threshold
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("kind", KINDS)
def test_a_checkpoint_without_tau_takes_the_configs_threshold(kind, tmp_path):
    model = per_head(kind)
    without_tau(model, tmp_path, list(HEAD_TAUS[kind]))
    loaded = from_pretrained(tmp_path)
    assert all(torch.equal(m.tau, torch.tensor(HEAD_TAUS[kind])) for m in dla_mixers(loaded))
    x = ids()
    torch.testing.assert_close(logits(loaded, x), logits(model, x), rtol=0, atol=0)
    without_tau(model, tmp_path, 0.45)
    assert all(torch.equal(m.tau, torch.full((len(HEAD_TAUS[kind]),), 0.45))
               for m in dla_mixers(from_pretrained(tmp_path)))


@pytest.mark.parametrize("change, message", [
    ("shape", r"shape of model\.layers\.0\.attn\.tau: checkpoint \[3\], model \[2\]"),
    ("one-missing", r"missing: model\.layers\.1\.attn\.tau \[2\]"),
])
def test_a_bad_tau_is_a_clear_error(change, message, tmp_path):
    save_pretrained(tiny("gdn"), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    if change == "shape":
        weights["model.layers.0.attn.tau"] = torch.zeros(3)
    else:
        weights.pop("model.layers.1.attn.tau")
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        from_pretrained(tmp_path)


def test_upcycled_models_take_tau_from_the_config(hf_mamba2):
    hf, folder = hf_mamba2
    thresholds = tuple(0.1 * (h + 1) for h in range(8))
    model = upcycle(folder, DLAConfig(policy="dla", capacity=4, threshold=thresholds))
    assert all(torch.equal(m.tau, torch.tensor(thresholds)) for m in dla_mixers(model))
    x = torch.randint(0, 64, (2, 40))
    torch.testing.assert_close(logits(model, x), hf(x).logits.detach(), rtol=1e-5, atol=1e-5)


# -- MLX ----------------------------------------------------------------------------------------------------

def mlx_model(folder):
    return load_model(folder)[0]


def mlx_taus(model):
    return {k: v for k, v in tree_flatten(model.parameters()) if k.endswith(".tau")}


@pytest.mark.parametrize("kind", KINDS)
def test_torch_mlx_torch_keeps_tau_and_logits(kind, tmp_path):
    model = per_head(kind)
    save_pretrained(model, tmp_path / "a")
    torch_to_mlx(tmp_path / "a", tmp_path / "m")
    converted = mlx_model(tmp_path / "m")
    taus = mlx_taus(converted)
    assert sorted(taus) == [PREFIX[kind].format(i=i) + ".tau" for i in range(2)]
    assert all(t.dtype == mx.float32 and np.array(t).tolist() == list(np.float32(HEAD_TAUS[kind]))
               for t in taus.values())
    assert not any(k.endswith(".tau") for k, _ in tree_flatten(converted.trainable_parameters()))
    x = ids(T=60)
    np.testing.assert_allclose(np.array(converted(mx.array(x.numpy()))), logits(model, x).numpy(), rtol=1e-4, atol=1e-4)
    mlx_to_torch(tmp_path / "m", tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    for name in (k for k in a if k.endswith(".tau")):
        assert b[name].dtype == torch.float32 and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("options", [{"q_bits": 4, "q_group_size": 32}, {"dtype": "bfloat16"}], ids=["4-bit", "bf16"])
def test_quantized_and_cast_mlx_models_keep_tau_float32(options, tmp_path):
    save_pretrained(per_head("gdn"), tmp_path / "torch")
    torch_to_mlx(tmp_path / "torch", tmp_path / "mlx", **options)
    model = mlx_model(tmp_path / "mlx")
    assert model.layers[0].attn.v_proj.weight.dtype != mx.float32  # the weights were quantized or cast
    for t in mlx_taus(model).values():
        assert t.dtype == mx.float32 and np.array(t).tolist() == list(np.float32(HEAD_TAUS["gdn"]))


@pytest.mark.parametrize("kind", KINDS)
def test_mlx_loads_a_checkpoint_without_tau_with_the_configs_threshold(kind, tmp_path):
    model = per_head(kind)
    without_tau(model, tmp_path / "torch", list(HEAD_TAUS[kind]))
    torch_to_mlx(tmp_path / "torch", tmp_path / "mlx")
    converted = mlx_model(tmp_path / "mlx")
    assert all(np.array(t).tolist() == list(np.float32(HEAD_TAUS[kind])) for t in mlx_taus(converted).values())
    x = ids(T=60)
    np.testing.assert_allclose(np.array(converted(mx.array(x.numpy()))), logits(model, x).numpy(), rtol=1e-4, atol=1e-4)


def test_mlx_a_wrong_shape_tau_is_a_clear_error(tmp_path):
    save_pretrained(tiny("gdn"), tmp_path / "torch")
    torch_to_mlx(tmp_path / "torch", tmp_path / "mlx")
    weights = mx.load(str(tmp_path / "mlx" / "model.safetensors"))
    weights["model.layers.1.attn.tau"] = mx.zeros((3,))
    mx.save_safetensors(str(tmp_path / "mlx" / "model.safetensors"), weights)
    with pytest.raises(ValueError, match=r"shape \(3,\) for parameter model\.layers\.1\.attn\.tau"):
        mlx_model(tmp_path / "mlx")
