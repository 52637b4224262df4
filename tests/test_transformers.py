"""The torch models through transformers: AutoConfig / AutoModelForCausalLM, save_pretrained / from_pretrained,
generate() against dla_torch.generate, lm-eval's ``hf`` model against the ``dla`` adapter, and never a pickle."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from dla_shared import DLAConfig
from dla_shared.hub import DEFAULT_MODEL, read_config
from dla_torch.generate import generate
from dla_torch.models import (
    DLAGatedDeltaNetConfig,
    DLAGatedDeltaNetForCausalLM,
    DLAMamba2Config,
    DLAMamba2ForCausalLM,
    from_pretrained,
    save_pretrained,
)

from helpers import WORDS, make_tokenizer

KINDS = ["mamba2", "gdn"]


def tiny(kind, vocab_size=61):
    """A small random model, every parameter perturbed so that each matters (read weights included)."""
    torch.manual_seed(0)
    dla = DLAConfig(policy="dla", capacity=4)
    if kind == "mamba2":
        model = DLAMamba2ForCausalLM(DLAMamba2Config(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                                     num_heads=4, head_dim=16, state_size=8, n_groups=2, dla=dla))
    else:
        model = DLAGatedDeltaNetForCausalLM(DLAGatedDeltaNetConfig(vocab_size=vocab_size, hidden_size=32,
                                                                   num_hidden_layers=2, num_heads=2, head_dim=8,
                                                                   dla=dla))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def left_padded(rows):
    """Rows of token ids left-padded with 0 to [B, T], and their mask [B, T] (1 = real token)."""
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
    return ids, mask


# -- Auto classes, save / load --------------------------------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_auto_classes_load_a_saved_folder_with_identical_logits(kind, tmp_path):
    model = tiny(kind)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is type(model.config) and config.to_dict() == model.config.to_dict()
    # config.json is the shared format: dla_shared's (and so MLX's) reader takes every key of it
    assert type(config).shared.from_dict(read_config(tmp_path)) == model.config.spec
    ids = torch.randint(0, 61, (2, 23))
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path), from_pretrained(tmp_path)):
        assert type(loaded) is type(model) and not loaded.training
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert set(load_file(tmp_path / "model.safetensors")) == set(model.state_dict())  # the names stay


@torch.no_grad()
def test_auto_classes_load_the_shipped_model():
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL)
    assert type(model) is DLAGatedDeltaNetForCausalLM
    by_hand = DLAGatedDeltaNetForCausalLM(DLAGatedDeltaNetConfig(**read_config(DEFAULT_MODEL)))
    weights = load_file(DEFAULT_MODEL / "model.safetensors")
    by_hand.load_state_dict(weights, strict=not by_hand.config.tie_word_embeddings)
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    assert torch.equal(model(ids).logits, by_hand.eval()(ids).logits)


def test_a_bad_config_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"unknown DLAMamba2Config field\(s\) \['num_head'\]"):
        DLAMamba2Config(num_head=4)
    with pytest.raises(TypeError, match="num_heads must be an integer"):
        AutoConfig.for_model("dla_gated_deltanet", num_heads="2")
    config = DLAGatedDeltaNetConfig()
    with pytest.raises(ValueError, match="num_hidden_layers must be > 0"):
        config.num_hidden_layers = 0  # setting a field validates it again


# -- never a pickle -------------------------------------------------------------------------------------

class Payload:
    """Unpickling this writes ``marker``: proof that a loader unpickled the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("with_safetensors", [False, True], ids=["pickle-only", "both"])
def test_a_pickle_checkpoint_is_never_unpickled(with_safetensors, tmp_path, monkeypatch):
    import pickle

    folder, marker = tmp_path / "model", tmp_path / "unpickled"
    model = tiny("gdn")
    model.save_pretrained(folder)
    if not with_safetensors:
        (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    pickle.loads((folder / "pytorch_model.bin").read_bytes())  # the payload works
    assert marker.exists()
    marker.unlink()
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    for load in (AutoModelForCausalLM.from_pretrained, from_pretrained):
        if with_safetensors:
            assert torch.equal(load(folder).lm_head.weight, model.lm_head.weight)
        else:
            with pytest.raises(FileNotFoundError, match=r"no model\*\.safetensors"):
                load(folder)
    with pytest.raises(ValueError, match=r"unsupported argument\(s\) \['use_safetensors'\]"):
        AutoModelForCausalLM.from_pretrained(folder, use_safetensors=False)
    assert not marker.exists() and not calls


# -- generate -------------------------------------------------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_equals_dla_generate_on_a_left_padded_batch(kind):
    model = tiny(kind)
    rng = random.Random(0)
    ids, mask = left_padded([[rng.randrange(61) for _ in range(n)] for n in (5, 17, 11)])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, generate(model, ids, 6, mask=mask.bool()))
    for i in range(3):  # and each row alone, unpadded
        row = ids[i, mask[i].bool()][None]
        assert torch.equal(model.generate(row, max_new_tokens=6, do_sample=False)[0, row.shape[1]:], out[i, -6:])


@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_sampling_follows_the_seed(kind):
    model = tiny(kind)
    ids, mask = left_padded([[3, 14, 15, 9], [2, 6]])

    def sampled(seed, **kw):
        torch.manual_seed(seed)
        return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0, pad_token_id=0,
                              **kw)

    out = sampled(1, temperature=0.9)
    torch.manual_seed(1)  # the same draws as dla_torch.generate's sampling
    assert torch.equal(out, generate(model, ids, 6, temperature=0.9, mask=mask.bool()))
    assert not torch.equal(out, sampled(2, temperature=0.9))
    assert torch.equal(sampled(3, temperature=0.7, top_p=0.8), sampled(3, temperature=0.7, top_p=0.8))


# -- lm-eval's hf model ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eval_folder(tmp_path_factory):
    """A tiny Gated DeltaNet saved with a tokenizer."""
    folder = tmp_path_factory.mktemp("hf_eval")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(200)]
    tokenizer = make_tokenizer(folder / "tok", docs)
    save_pretrained(tiny("gdn", tokenizer.get_vocab_size()), folder / "model", tokenizer_dir=folder / "tok")
    return folder / "model"


def requests(kind, *arguments):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def test_lm_eval_hf_model_gives_the_adapters_loglikelihoods(eval_folder):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (lm-eval[hf])")
    from lm_eval.models.huggingface import HFLM

    from dla_torch.lm_eval_adapter import DLALM

    pairs = [("the cache opens a new state where the text changes and", " merges the pair"),
             ("the cache", " opens"), ("merges the pair of least", " density")]
    hf = HFLM(pretrained=str(eval_folder), device="cpu", batch_size=2)
    assert type(hf.model) is DLAGatedDeltaNetForCausalLM
    ours = DLALM(pretrained=str(eval_folder), batch_size=2, device="cpu", seq_len=8)
    got = hf.loglikelihood(requests("loglikelihood", *pairs), disable_tqdm=True)
    expected = ours.loglikelihood(requests("loglikelihood", *pairs), disable_tqdm=True)
    for (logprob, greedy), (want, want_greedy) in zip(got, expected):
        assert logprob == pytest.approx(want, rel=1e-5) and greedy == want_greedy and logprob < 0
    text = [("the text changes and the cache opens a new state",)]
    rolling = hf.loglikelihood_rolling(requests("loglikelihood_rolling", *text), disable_tqdm=True)
    assert rolling == pytest.approx(ours.loglikelihood_rolling(requests("loglikelihood_rolling", *text),
                                                               disable_tqdm=True), rel=1e-5)
    until = [("the cache opens a new state where", {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False})]
    assert hf.generate_until(requests("generate_until", *until), disable_tqdm=True) == \
        ours.generate_until(requests("generate_until", *until), disable_tqdm=True)


def test_saved_config_json_keeps_the_shared_keys_only(tmp_path):
    """What save_pretrained writes beside the shared fields is metadata that dla_shared's reader ignores."""
    model = tiny("mamba2")
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    extra = set(written) - set(model.config.to_dict())
    assert extra == {"architectures", "dtype", "transformers_version"}, extra
    assert written["architectures"] == ["DLAMamba2ForCausalLM"]
