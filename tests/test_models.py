"""The PyTorch DLA causal LMs: packing, caching, checkpoints, upcycling from transformers' Mamba-2."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dla_shared import DLAConfig
from dla_torch.generate import generate, sample
from dla_torch.models import from_pretrained, save_pretrained
from dla_torch.models.base import dla_mixers
from dla_torch.models.upcycle import main as upcycle_cli
from dla_torch.models.upcycle import upcycle

from helpers import POLICY_CONFIGS, tiny

MODELS = [pytest.param(kind, policy, id=f"{kind}-{policy}") for kind in ("mamba2", "gdn")
          for policy in ("fixed", "dla")]


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@torch.no_grad()
@pytest.mark.parametrize("kind, policy", MODELS)
def test_packed_batch_equals_padded_batch(kind, policy):
    model = tiny(kind, policy)
    lengths = [9, 23, 14]
    docs = [torch.randint(0, 61, (n,)) for n in lengths]
    cu = torch.tensor([0, 9, 32, 46])
    packed = model(torch.cat(docs)[None], cu_seqlens=cu).logits
    T = max(lengths)
    padded = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.bool)
    for i, d in enumerate(docs):  # left padding, as in batched generation
        padded[i, T - len(d):], mask[i, T - len(d):] = d, True
    batch = model(padded, mask=mask).logits
    for i, d in enumerate(docs):
        close(packed[0, cu[i]:cu[i + 1]], batch[i, T - len(d):])
        close(packed[0, cu[i]:cu[i + 1]], model(d[None]).logits[0])


@torch.no_grad()
@pytest.mark.parametrize("kind, policy", MODELS)
def test_prefill_in_slices_then_decode_equals_one_forward(kind, policy):
    model = tiny(kind, policy)
    ids = torch.randint(0, 61, (2, 150))
    full = model(ids).logits
    cache = model.make_cache()
    parts = [model(ids[:, :64], cache=cache).logits, model(ids[:, 64:137], cache=cache).logits]
    parts += [model(ids[:, t : t + 1], cache=cache).logits for t in range(137, 150)]
    close(torch.cat(parts, dim=1), full)


@torch.no_grad()
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kind", ["mamba2", "gdn"])
def test_save_then_load_gives_identical_logits(kind, tied, tmp_path):
    model = tiny(kind, tie_word_embeddings=tied)
    ids = torch.randint(0, 61, (1, 40))
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == model.config.model_type and config["dla"]["policy"] == "dla"
    loaded = from_pretrained(tmp_path)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert ("lm_head.weight" in load_file(tmp_path / "model.safetensors")) is not tied


def read_projection(mixer):
    """The weights that make a mixer's read weights: Gated DeltaNet's l_proj, Mamba-2's last H * K rows of
    in_proj. [H * K, hidden]."""
    c = mixer.config
    return mixer.l_proj.weight if hasattr(mixer, "l_proj") else mixer.in_proj.weight[-c.num_heads * c.dla.num_slots:]


@torch.no_grad()
@pytest.mark.parametrize("kind", ["mamba2", "gdn"])
def test_new_models_have_small_normal_weights_and_read_every_state_with_weight_one(kind):
    """transformers' and fla's initialization (normal, std 0.02) and a zero read-weight projection: every state
    is read with weight 1, so a new model's policy does not change its logits (DESIGN's invariant)."""
    models = {p: tiny(kind, dla=DLAConfig(policy=p, capacity=4, block_size=5), perturb=False) for p in ("fixed", "dla")}
    model = models["dla"]
    assert all(not read_projection(mixer).any() for mixer in dla_mixers(model))
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and not name.endswith("l_proj"):
            weight = module.weight[module.weight != 0]  # Mamba-2's in_proj: all but its read-weight rows
            assert abs(weight.std().item() - 0.02) < 0.006 and abs(weight.mean().item()) < 0.006, name
    ids = torch.randint(0, 61, (2, 40))
    close(models["fixed"](ids).logits, model(ids).logits)


@pytest.mark.parametrize("kind", ["mamba2", "gdn"])
def test_tied_embeddings_train(kind):
    """A new model with tied embeddings starts near a uniform guess and learns a batch; the tie holds."""
    model = tiny(kind, tie_word_embeddings=True, perturb=False).train()
    ids = torch.randint(0, 61, (4, 33), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(61)) < 0.1 and losses[-1] < losses[0] - 1.0, losses
    assert model.lm_head.weight is model.body.embeddings.weight


@pytest.mark.parametrize("change, message", [
    ("missing", r"missing: backbone\.layers\.1\.mixer\.L \[4, 4\]"),
    ("extra", r"unexpected: backbone\.layers\.0\.mixer\.extra \[3\]"),
    ("shape", r"shape of backbone\.norm_f\.weight: checkpoint \[5\], model \[32\]"),
])
def test_bad_checkpoint_is_a_clear_error(change, message, tmp_path):
    save_pretrained(tiny("mamba2"), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    if change == "missing":
        weights.pop("backbone.layers.1.mixer.L")
    elif change == "extra":
        weights["backbone.layers.0.mixer.extra"] = torch.zeros(3)
    else:
        weights["backbone.norm_f.weight"] = torch.zeros(5)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        from_pretrained(tmp_path)


def test_unknown_model_type_and_missing_files(tmp_path):
    save_pretrained(tiny("gdn"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"unknown model_type 'llama'.*dla_gated_deltanet"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config | {"hidden_sizes": 3}))
    with pytest.raises(ValueError, match=r"unknown DLAGatedDeltaNetConfig field\(s\) \['hidden_sizes'\]"):
        from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no model"):
        from_pretrained(tmp_path)


@torch.no_grad()
@pytest.mark.parametrize("policy", list(POLICY_CONFIGS))
def test_upcycled_mamba2_equals_transformers(policy, hf_mamba2):
    hf, folder = hf_mamba2
    ids = torch.randint(0, 64, (2, 45))
    model = upcycle(folder, POLICY_CONFIGS[policy])
    close(model(ids).logits, hf(ids).logits)


def test_upcycle_cli_writes_a_loadable_checkpoint(hf_mamba2, tmp_path, capsys):
    hf, folder = hf_mamba2
    assert upcycle_cli([str(folder), str(tmp_path / "dla"), "--policy", "fenwick", "--capacity", "10"]) == 0
    assert "dla_mamba2" in capsys.readouterr().out
    model = from_pretrained(tmp_path / "dla")
    assert model.config.dla.policy == "fenwick"
    ids = torch.randint(0, 64, (1, 30))
    with torch.no_grad():
        close(model(ids).logits, hf(ids).logits)


def test_upcycle_never_overwrites_its_source_or_another_model(hf_mamba2, tmp_path, capsys):
    """`dla-upcycle M M` once rewrote M as a DLA model; a non-empty OUT needs --force, which replaces the model
    in it (weights and manifest) and keeps other files. Bad policy arguments are errors, not tracebacks."""
    _, folder = hf_mamba2
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    for out in (folder, folder / "sub"):
        with pytest.raises(SystemExit):
            upcycle_cli([str(folder), str(out)])
        assert "is the source folder or inside it" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "manifest.json").write_text("{}")
    with pytest.raises(SystemExit):
        upcycle_cli([str(folder), str(out)])
    assert "is not empty" in capsys.readouterr().err
    assert upcycle_cli([str(folder), str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and not (out / "manifest.json").exists()
    assert from_pretrained(out).config.dla.policy == "dla"
    with pytest.raises(SystemExit):
        upcycle_cli([str(folder), str(tmp_path / "k0"), "--capacity", "0"])
    assert "capacity" in capsys.readouterr().err and not (tmp_path / "k0").exists()


def test_upcycle_rejects_other_model_types(tmp_path):
    save_pretrained(tiny("gdn"), tmp_path)
    with pytest.raises(ValueError, match=r"expected a Mamba-2, Log-Linear Mamba-2 or Gated DeltaNet checkpoint"
                                         r".*'dla_gated_deltanet'"):
        upcycle(tmp_path, DLAConfig())


@torch.no_grad()
@pytest.mark.parametrize("kind", ["mamba2", "gdn"])
def test_cached_generation_equals_recomputing_every_step(kind):
    model = tiny(kind)
    prompt = torch.randint(0, 61, (2, 30))
    out = generate(model, prompt, max_new_tokens=12, prefill_step=16)
    ids = prompt
    for _ in range(12):  # no cache: the whole text again each step
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


@torch.no_grad()
def test_left_padded_generation_equals_each_row_alone():
    model = tiny("gdn")
    rows = [torch.randint(0, 61, (n,)) for n in (7, 19)]
    padded = torch.zeros(2, 19, dtype=torch.long)
    mask = torch.zeros(2, 19, dtype=torch.bool)
    for i, r in enumerate(rows):
        padded[i, 19 - len(r):], mask[i, 19 - len(r):] = r, True
    batch = generate(model, padded, max_new_tokens=8, mask=mask)
    for i, r in enumerate(rows):
        assert torch.equal(batch[i, 19:], generate(model, r[None], max_new_tokens=8)[0, len(r):])


def test_sampling_respects_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, 0.7, gen)) for _ in range(200)}
    assert draws == {0, 1}
    with pytest.raises(ValueError, match="top_p in"):
        generate(tiny("gdn"), torch.zeros(1, 3, dtype=torch.long), top_p=0.0)


def test_fla_gated_deltanet_maps_by_name(tmp_path):
    """An fla GatedDeltaNet checkpoint loads tensor by tensor: names, shapes and values (fla's forward
    needs a GPU, so logits are not compared here)."""
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    config = GatedDeltaNetConfig(hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=8, vocab_size=61,
                                 fuse_norm=False, fuse_swiglu=False, fuse_cross_entropy=False)
    source = GatedDeltaNetForCausalLM(config)
    source.save_pretrained(tmp_path)
    model = upcycle(tmp_path, POLICY_CONFIGS["fenwick"])
    ours = model.state_dict()
    for name, tensor in source.state_dict().items():
        assert torch.equal(ours[name], tensor), name
    assert all(torch.equal(layer.attn.L, torch.ones(2, 8)) and not layer.attn.l_proj.weight.any()
               for layer in model.layers)


def test_fla_log_linear_mamba2_maps_by_name(tmp_path):
    """An fla Log-Linear Mamba-2 checkpoint loads tensor by tensor into dla_mamba2 with its MLP and read
    weights (``mixer_norm`` renamed to ``norm``); the capacity must be its number of levels."""
    from fla.models import LogLinearMamba2Config, LogLinearMamba2ForCausalLM

    config = LogLinearMamba2Config(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16,
                                   state_size=8, residual_in_fp32=False, fuse_norm=False, fuse_cross_entropy=False)
    source = LogLinearMamba2ForCausalLM(config)
    source.save_pretrained(tmp_path)
    levels = source.backbone.layers[0].mixer.L.shape[1]
    with pytest.raises(ValueError, match=f"use capacity={levels}"):
        upcycle(tmp_path, DLAConfig(policy="fenwick", capacity=levels + 1))
    model = upcycle(tmp_path, DLAConfig(policy="fenwick", capacity=levels))
    assert model.config.read_weight_norm is False and model.config.mlp_intermediate_size
    ours = model.state_dict()
    for name, tensor in source.state_dict().items():
        assert torch.equal(ours[name.replace(".mixer_norm.", ".norm.")], tensor), name


@pytest.mark.parametrize("kind", ["mamba2", "gdn"])
def test_a_cache_refuses_another_batch_size_or_cache_config(kind):
    model = tiny(kind)
    cache = model.make_cache()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        with pytest.raises(ValueError, match="the cache holds 1 sequences but the input has batch size 2"):
            model(torch.tensor([[4], [5]]), cache=cache)
        other = tiny(kind, dla=DLAConfig(policy="fixed", capacity=4))
        with pytest.raises(ValueError,
                           match="initial_state was made under policy='dla'.* but config is policy='fixed'"):
            other(torch.tensor([[4]]), cache=cache)
