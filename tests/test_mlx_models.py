"""The MLX DLA models: parity with torch, lossless conversion, and mlx-lm's generation and prompt caches."""

import copy
import json
import random
import re

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm import generate
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import ArraysCache, load_prompt_cache, save_prompt_cache
from safetensors.torch import load_file

from dla_mlx.convert import load, mlx_to_torch, torch_to_mlx
from dla_mlx.convert import main as convert_cli
from dla_mlx.generate import generate as mlx_generate
from dla_mlx.models.base import dla_mixers
from dla_torch.generate import generate as torch_generate
from dla_torch.models import save_pretrained

from helpers import WORDS, make_tokenizer, tiny

VOCAB = 300  # the tokenizer's and the models' (token ids past an embedding table are undefined in MLX)
MODELS = [pytest.param(kind, policy, id=f"{kind}-{policy}") for kind in ("mamba2", "gdn")
          for policy in ("single", "fenwick", "dla")]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    make_tokenizer(folder, [" ".join(rng.choice(WORDS) for _ in range(20)) for _ in range(100)], vocab_size=VOCAB)
    return folder


def converted(kind, policy, folder, tokenizer_dir, **kw):
    model = tiny(kind, policy, vocab_size=VOCAB, **kw)
    save_pretrained(model, folder / "torch", tokenizer_dir=tokenizer_dir)
    torch_to_mlx(folder / "torch", folder / "mlx")
    mlx_model, tokenizer = load(folder / "mlx")
    return model, mlx_model, tokenizer


@pytest.mark.parametrize("kind, policy", MODELS)
def test_mlx_logits_equal_torch(kind, policy, tmp_path, tokenizer_dir):
    model, mlx_model, _ = converted(kind, policy, tmp_path, tokenizer_dir)
    ids = np.random.default_rng(1).integers(0, 61, (2, 90))
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.array(mlx_model(mx.array(ids))), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", ["mamba2", "gdn"])
def test_torch_mlx_torch_round_trip_is_bit_exact(kind, dtype, tmp_path, tokenizer_dir):
    save_pretrained(tiny(kind, vocab_size=VOCAB).to(dtype), tmp_path / "a", tokenizer_dir=tokenizer_dir)
    torch_to_mlx(tmp_path / "a", tmp_path / "m")
    mlx_to_torch(tmp_path / "m", tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        expected = torch.float32 if name.endswith(".tau") else dtype  # thresholds stay float32
        assert a[name].dtype == b[name].dtype == expected and torch.equal(a[name], b[name]), name
    assert (tmp_path / "b" / "tokenizer.json").exists()


@pytest.mark.parametrize("kind", ["mamba2", "gdn"])
def test_prefill_in_slices_and_decode_equal_one_forward(kind, tmp_path, tokenizer_dir):
    _, model, _ = converted(kind, "dla", tmp_path, tokenizer_dir)
    ids = mx.array(np.random.default_rng(2).integers(0, 61, (1, 75)))
    full = model(ids)
    # mlx-lm's own prefill, in slices of 16 tokens, then its first step
    (token, logprobs), = list(generate_step(ids[0, :70], model, max_tokens=1, prefill_step_size=16))
    expected = full[0, 69] - mx.logsumexp(full[0, 69])
    np.testing.assert_allclose(np.array(logprobs), np.array(expected), atol=1e-5)
    cache = model.make_cache()
    parts = [model(ids[:, :32], cache=cache), model(ids[:, 32:70], cache=cache)]
    parts += [model(ids[:, t : t + 1], cache=cache) for t in range(70, 75)]
    np.testing.assert_allclose(np.array(mx.concatenate(parts, axis=1)), np.array(full), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mamba2", "gdn"])
def test_generate_mirrors_torch_generate(kind, tmp_path, tokenizer_dir):
    """`dla_mlx.generate.generate` gives `dla_torch.generate.generate`'s greedy tokens on the converted model,
    the prompt prefilled in slices in both; it stops after ``eos_id`` and names bad arguments."""
    model, mlx_model, _ = converted(kind, "dla", tmp_path, tokenizer_dir)
    prompt = np.random.default_rng(2).integers(0, VOCAB, 23)
    expected = torch_generate(model, torch.tensor(prompt[None]), 10, prefill_step=8)[0].tolist()
    tokens = mlx_generate(mlx_model, mx.array(prompt), 10, prefill_step=8).tolist()
    assert tokens == expected
    stop = expected[23 + 4]
    first = expected.index(stop, 23)  # the first time it is generated
    assert mlx_generate(mlx_model, mx.array(prompt), 10, eos_id=stop).tolist() == expected[: first + 1]
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        mlx_generate(mlx_model, mx.array(prompt), 4, temperature=float("nan"))
    with pytest.raises(ValueError, match=r"input_ids must be one non-empty sequence \[T\], got shape \[1, 23\]"):
        mlx_generate(mlx_model, mx.array(prompt[None]), 4)


def test_mlx_lm_generate_is_greedy_decoding_and_prompt_caches_continue(tmp_path, tokenizer_dir):
    _, model, tokenizer = converted("gdn", "dla", tmp_path, tokenizer_dir)
    prompt = tokenizer.encode("the cache opens a new state")
    steps = list(generate_step(mx.array(prompt), model, max_tokens=8))
    for i, (token, logprobs) in enumerate(steps):  # without a cache: the whole text again each step
        ids = prompt + [int(t) for t, _ in steps[:i]]
        logits = model(mx.array([ids]))[0, -1]
        np.testing.assert_allclose(np.array(logprobs), np.array(logits - mx.logsumexp(logits)), atol=1e-4)
        assert int(token) == int(mx.argmax(logprobs))
    assert isinstance(generate(model, tokenizer, prompt=prompt, max_tokens=8), str)
    cache = model.make_cache()
    model(mx.array([prompt]), cache=cache)
    save_prompt_cache(str(tmp_path / "prompt.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "prompt.safetensors"))
    nxt = mx.array([[5, 9, 13]])
    np.testing.assert_array_equal(np.array(model(nxt, cache=loaded)), np.array(model(nxt, cache=cache)))


def test_a_prompt_cache_continues_only_in_a_model_with_the_same_cache(tmp_path, tokenizer_dir):
    """A prompt cache saved from a `dla` model, loaded into a `fenwick` one (or one whose thresholds differ), or
    made by an older version (no physical layout), is refused instead of running with other outputs; a cache for
    another batch size says so."""
    _, model, _ = converted("gdn", "dla", tmp_path / "dla", tokenizer_dir)
    _, other, _ = converted("gdn", "fenwick", tmp_path / "fenwick", tokenizer_dir)
    cache = model.make_cache()
    model(mx.array([[1, 2, 3]]), cache=cache)
    save_prompt_cache(str(tmp_path / "prompt.safetensors"), cache)
    with pytest.raises(ValueError, match="this cache was made by a model whose DLA cache differs"):
        other(mx.array([[4]]), cache=load_prompt_cache(str(tmp_path / "prompt.safetensors")))
    for mixer in dla_mixers(model):
        mixer.tau = mixer.tau + 0.5
    with pytest.raises(ValueError, match="this cache was made by a model whose DLA cache differs"):
        model(mx.array([[4]]), cache=load_prompt_cache(str(tmp_path / "prompt.safetensors")))
    with pytest.raises(ValueError, match="the cache holds 1 sequences but the input has batch size 2"):
        model(mx.array([[4], [5]]), cache=cache)
    older = []  # a cache of the layout before slot and decay: the state's five arrays, then the signature
    for c in cache:
        entries = c.cache[: model.conv_states + 5] + c.cache[-1:]
        older.append(ArraysCache(size=len(entries)))
        older[-1].cache = entries
    with pytest.raises(ValueError, match="or by an older version of dla"):
        model(mx.array([[4]]), cache=older)


def test_left_padded_batch_equals_each_row_alone(tmp_path, tokenizer_dir):
    _, model, _ = converted("mamba2", "fixed", tmp_path, tokenizer_dir)
    rows = [np.random.default_rng(i).integers(0, 61, n) for i, n in enumerate((9, 21))]
    padded = np.zeros((2, 21), np.int64)
    for i, r in enumerate(rows):
        padded[i, 21 - len(r):] = r
    cache = [ArraysCache(size=len(model.make_cache()[0].cache), left_padding=[12, 0]) for _ in model.layers]
    batch = np.array(model(mx.array(padded), cache=cache))
    step = np.array(model(mx.array([[3], [4]]), cache=cache))
    for i, r in enumerate(rows):
        alone_cache = model.make_cache()
        alone = np.array(model(mx.array(r[None]), cache=alone_cache))
        np.testing.assert_allclose(batch[i, 21 - len(r):], alone[0], atol=1e-5, rtol=1e-5)
        nxt = np.array(model(mx.array([[3 + i]]), cache=alone_cache))
        np.testing.assert_allclose(step[i], nxt[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_models_generate_and_keep_precise_parameters(bits, tmp_path, tokenizer_dir):
    model = tiny("gdn", "dla", vocab_size=VOCAB)
    save_pretrained(model, tmp_path / "torch", tokenizer_dir=tokenizer_dir)
    torch_to_mlx(tmp_path / "torch", tmp_path / "q", q_bits=bits, q_group_size=32)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["bits"] == bits
    quantized, tokenizer = load(tmp_path / "q")
    attn = quantized.layers[0].attn
    assert type(attn.q_proj).__name__ == "QuantizedLinear" and type(attn.l_proj).__name__ == "Linear"
    np.testing.assert_array_equal(np.array(attn.A_log), model.layers[0].attn.A_log.detach().numpy())
    assert isinstance(generate(quantized, tokenizer, prompt="the cache", max_tokens=4), str)
    with pytest.raises(ValueError, match="quantized; only unquantized"):
        mlx_to_torch(tmp_path / "q", tmp_path / "back")


def test_deepcopy_dtype_and_cli(tmp_path, tokenizer_dir, capsys):
    _, model, _ = converted("mamba2", "dla", tmp_path, tokenizer_dir)
    clone = copy.deepcopy(model)
    ids = mx.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(np.array(clone(ids)), np.array(model(ids)))
    assert convert_cli([str(tmp_path / "torch"), str(tmp_path / "half"), "--dtype", "bfloat16"]) == 0
    half, _ = load(tmp_path / "half")
    assert half.layers[0].mixer.in_proj.weight.dtype == mx.bfloat16
    assert half.layers[0].mixer.A_log.dtype == mx.float32  # kept precise by cast_predicate
    (tmp_path / "torch" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="unknown model_type 'llama'"):
        torch_to_mlx(tmp_path / "torch", tmp_path / "x")


def test_mamba2_converted_straight_to_mlx_equals_mlx_lm_mamba2(tmp_path):
    """A transformers Mamba-2, upcycled under `single` and converted in one command, is mlx-lm's `mamba2`
    (one group: mlx-lm's gated norm does not normalize per group)."""
    from mlx_lm.utils import load_model
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    config = Mamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, head_dim=8,
                          num_heads=8, n_groups=1, conv_kernel=4)
    source = Mamba2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in source.named_parameters():
            if "norm" in name or name.endswith(".D"):
                p.add_(0.3 * torch.randn_like(p))
    source.save_pretrained(tmp_path / "hf")
    expected_model, _ = load_model(tmp_path / "hf", model_config={"intermediate_size": 64})
    assert convert_cli([str(tmp_path / "hf"), str(tmp_path / "dla"), "--policy", "single"]) == 0
    model, _ = load_model(tmp_path / "dla", trust_remote_code=True)  # through the folder's model_file
    assert model.args.dla.policy == "single"
    ids = mx.array(np.random.default_rng(0).integers(0, 64, (2, 40)))
    np.testing.assert_allclose(np.array(model(ids)), np.array(expected_model(ids)), atol=1e-4, rtol=1e-4)


def test_dla_generate_streams_text_and_speed(tmp_path, tokenizer_dir, capsys):
    from dla_mlx.generate import main as generate_cli

    converted("gdn", "dla", tmp_path, tokenizer_dir)
    assert generate_cli(["--model", str(tmp_path / "mlx"), "--prompt", "the cache", "-m", "12", "--temp", "0.8",
                         "--top-p", "0.9", "--seed", "1", "--boundaries", str(tmp_path / "b.png")]) == 0
    out = capsys.readouterr().out
    _, tokenizer = load(tmp_path / "mlx")
    assert f"Prompt: {len(tokenizer.encode('the cache'))} tokens" in out
    assert re.search(r"Generation: \d+ tokens, [\d.]+ tokens-per-sec", out) and "Peak memory" in out
    assert "State boundaries, layer 0, head 0" in out and (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_trace_text_replays_a_layer_through_the_oracle(tmp_path, tokenizer_dir):
    """The recorded inputs of a layer, replayed through the oracle, take the model's own decisions."""
    import importlib

    from dla_mlx import dla_attention
    from dla_mlx.inspect import mark_boundaries, trace_text

    _, model, _ = converted("mamba2", "dla", tmp_path, tokenizer_dir)
    ids = [int(i) for i in np.random.default_rng(3).integers(0, 61, 40)]
    trace = trace_text(model, ids, layer=1)
    assert importlib.import_module(type(model).__module__).dla_attention is dla_attention  # the op is restored
    assert trace.opened.shape == (1, 40, model.args.num_heads) and trace.opened[0, 0].all()
    assert np.nanmin(np.abs(trace.score - model.args.dla.threshold)) > 1e-4  # no float32 near-ties
    cache = model.make_cache()
    model(mx.array(ids)[None], cache=cache)
    np.testing.assert_array_equal(np.array(cache[1][2])[0], trace.n[0, -1])  # layer 1's token counts per slot
    marked = mark_boundaries([f"{i} " for i in ids], trace)
    assert marked.count("|") == int(trace.opened[0, 1:, 0].sum())
    with pytest.raises(ValueError, match="layer must be in"):
        trace_text(model, ids, layer=2)


def _snapshot(folder):
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_convert_refuses_to_write_over_its_source(tmp_path, tokenizer_dir):
    """`dla-convert M M` once rewrote M's weights in MLX layout and then crashed, leaving M unloadable."""
    save_pretrained(tiny("gdn", vocab_size=VOCAB), tmp_path / "m", tokenizer_dir=tokenizer_dir)
    before = _snapshot(tmp_path / "m")
    for out in (tmp_path / "m", tmp_path / "m" / "sub"):
        with pytest.raises(SystemExit):
            convert_cli([str(tmp_path / "m"), str(out)])
        with pytest.raises(ValueError, match="is the source folder or inside it"):
            torch_to_mlx(tmp_path / "m", out, force=True)
    assert _snapshot(tmp_path / "m") == before


def test_convert_into_a_non_empty_folder_needs_force_and_drops_stale_shards(tmp_path, tokenizer_dir, capsys):
    model, _, _ = converted("gdn", "dla", tmp_path, tokenizer_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    (out / "manifest.json").write_text('{"files": {"config.json": "0"}}')  # the old model's hashes
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        convert_cli([str(tmp_path / "torch"), str(out)])
    assert "not empty" in capsys.readouterr().err and (out / "model-00001-of-00002.safetensors").exists()
    assert convert_cli([str(tmp_path / "torch"), str(out), "--force"]) == 0
    assert not (out / "model-00001-of-00002.safetensors").exists() and not (out / "manifest.json").exists()
    assert (out / "notes.txt").read_text() == "mine"
    ids = np.random.default_rng(1).integers(0, 61, (1, 20))
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.array(load(out)[0](mx.array(ids))), expected, atol=1e-4, rtol=1e-4)
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []


def test_convert_to_torch_from_a_torch_folder_is_a_copy(tmp_path, tokenizer_dir):
    """The layout is read from the weights: a torch source converted `--to torch` keeps its conv layout."""
    save_pretrained(tiny("mamba2", vocab_size=VOCAB), tmp_path / "a", tokenizer_dir=tokenizer_dir)
    assert convert_cli([str(tmp_path / "a"), str(tmp_path / "b"), "--to", "torch"]) == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


BAD_CONVERSIONS = {  # extra arguments after SOURCE OUT: what stderr says
    "q-bits-7": (["--quantize", "--q-bits", "7"], "argument --q-bits: invalid choice: 7"),
    "q-group-size-0": (["--quantize", "--q-group-size", "0"], "argument --q-group-size: invalid choice: 0"),
    "nothing-to-quantize": (["--quantize", "--q-group-size", "128"],
                            "no linear layer's input size is a multiple of the group size 128"),
    "policy-of-a-dla-model": (["--policy", "fenwick"], "--policy and --capacity set the policy of a Mamba-2"),
    "not-a-model": (["--source", "empty"], "no config.json"),
    "to-torch-of-a-llama": (["--source", "llama", "--to", "torch"], "unknown model_type 'llama'"),
}


@pytest.mark.parametrize("case", BAD_CONVERSIONS)
def test_convert_refuses_bad_arguments_with_a_message(case, tmp_path, tokenizer_dir, capsys):
    """Each once went wrong: a quantization setting silently replaced (0 bits became 4) or a process crash
    (group size 0), a model marked quantized with nothing quantized, a policy ignored, a traceback."""
    # the tiny Mamba-2's linear layers take 32 or 64 inputs
    save_pretrained(tiny("mamba2", vocab_size=VOCAB), tmp_path / "m", tokenizer_dir=tokenizer_dir)
    (tmp_path / "empty").mkdir()
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    extra, message = BAD_CONVERSIONS[case]
    source = tmp_path / "m"
    if extra[0] == "--source":
        source, extra = tmp_path / extra[1], extra[2:]
    with pytest.raises(SystemExit) as exit_:
        convert_cli([str(source), str(tmp_path / "out"), *extra])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_failed_convert_leaves_no_half_written_model(tmp_path, tokenizer_dir, monkeypatch):
    import dla_mlx.convert as convert

    save_pretrained(tiny("gdn", vocab_size=VOCAB), tmp_path / "m", tokenizer_dir=tokenizer_dir)

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(convert, "copy_tokenizer", fail)
    with pytest.raises(OSError, match="disk full"):
        torch_to_mlx(tmp_path / "m", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("ids", [[[1, 300]], [[-1, 2]]], ids=["past-the-vocabulary", "negative"])
def test_token_ids_outside_the_vocabulary_are_refused(ids, tmp_path, tokenizer_dir):
    """By both backends' models, with the same message (MLX's embedding would read past its table, torch's
    CPU one raised an IndexError that names no id)."""
    model, mlx_model, _ = converted("gdn", "dla", tmp_path, tokenizer_dir)
    message = r"token ids must be in \[0, vocab_size = 300\), got ids from " + f"{min(ids[0])} to {max(ids[0])}"
    with pytest.raises(ValueError, match=message):
        mlx_model(mx.array(ids))
    with pytest.raises(ValueError, match=message):
        model(torch.tensor(ids))


def test_a_folder_that_is_not_a_usable_dla_model_is_named_as_such(tmp_path, tokenizer_dir, capsys):
    """dla-generate on a plain Mamba-2 once failed inside mlx-lm with a TypeError, on a folder without a
    tokenizer with transformers' 'install sentencepiece', and torch's loader read an MLX folder as a list of
    shape mismatches."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    from dla_mlx.generate import main as generate_cli
    from dla_torch.models import from_pretrained

    Mamba2ForCausalLM(Mamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, state_size=8, head_dim=8,
                                   num_heads=8, n_groups=1)).save_pretrained(tmp_path / "hf")
    converted("gdn", "dla", tmp_path, tokenizer_dir)
    (tmp_path / "no-tokenizer").mkdir()
    for name in ("config.json", "model.safetensors", "dla_model.py"):
        (tmp_path / "no-tokenizer" / name).write_bytes((tmp_path / "mlx" / name).read_bytes())
    for folder, message in [("hf", "unknown model_type 'mamba2'; expected one of ['dla_mamba2', 'dla_gated_deltanet'] "
                                   "(`dla-convert SOURCE OUT` makes a DLA model"),
                            ("no-tokenizer", "has no tokenizer (tokenizer.json")]:
        with pytest.raises(SystemExit) as exit_:
            generate_cli(["--model", str(tmp_path / folder), "--prompt", "x"])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"is an MLX checkpoint \(dla-convert's\).*--to torch"):
        from_pretrained(tmp_path / "mlx")
