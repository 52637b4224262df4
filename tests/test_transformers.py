"""The torch models through transformers: AutoConfig / AutoModelForCausalLM, save_pretrained / from_pretrained,
generate() against dla_torch.generate, lm-eval's ``hf`` model (in this process and its command line on a folder's
remote code) against log-likelihoods computed here, dla-convert and the remote code, and never a pickle."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from dla_shared.hub import DEFAULT_MODEL, read_config
from dla_torch.evaluate import load, score
from dla_torch.generate import generate
from dla_torch.models import (
    DLAGatedDeltaNetConfig,
    DLAGatedDeltaNetForCausalLM,
    DLAMamba2Config,
    from_pretrained,
    save_pretrained,
)

from helpers import WORDS, make_tokenizer, tiny

KINDS = ["mamba2", "gdn"]


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                           "modeling_dla.py"]
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


# Run in a fresh process: load each folder (argv) with the Auto classes and trust_remote_code, dla_torch not
# imported first, and print, as the last line, each model's class and its 6 greedy tokens after the prompt (argv[1]).
# Without the flag, transformers asks on stdout, reads no answer and refuses the folder.
REMOTE_CODE_RUN = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
prompt, folders = torch.tensor([json.loads(sys.argv[1])]), sys.argv[2:]
try:
    AutoModelForCausalLM.from_pretrained(folders[0])
    raise SystemExit("loaded without trust_remote_code")
except ValueError as error:
    assert "trust_remote_code" in str(error), error
assert "dla_torch" not in sys.modules
results = []
for folder in folders:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tokens = model.generate(prompt, max_new_tokens=6, do_sample=False)[0].tolist()
    results.append([type(model).__module__, type(model).__name__, tokens])
print("\\n" + json.dumps(results))
"""


@torch.no_grad()
def test_a_process_without_dla_torch_loads_saved_folders_and_the_shipped_model_with_trust_remote_code(tmp_path):
    """The folder's auto_map names its modeling_dla.py, which imports the installed package's classes."""
    models = {kind: tiny(kind) for kind in KINDS}
    for kind, model in models.items():
        model.save_pretrained(tmp_path / kind)
    models["shipped"] = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL)
    prompt = [3, 14, 15, 9, 2, 6]
    folders = [str(tmp_path / kind) for kind in KINDS] + [str(DEFAULT_MODEL)]
    run = subprocess.run([sys.executable, "-c", REMOTE_CODE_RUN, json.dumps(prompt), *folders],
                         env={**os.environ, "HF_HOME": str(tmp_path / "hf")}, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = [[type(model).__module__, type(model).__name__,
                 model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0].tolist()]
                for model in models.values()]
    assert json.loads(run.stdout.splitlines()[-1]) == expected


def test_the_remote_code_stays_with_torch_folders(tmp_path):
    """dla-convert: an MLX folder carries mlx-lm's model_file, not the torch auto_map; converted back to torch, the
    folder has them again (config and modeling_dla.py as save_pretrained writes them)."""
    from dla_mlx.convert import mlx_to_torch, torch_to_mlx

    model = tiny("mamba2")
    model.save_pretrained(tmp_path / "torch")
    torch_to_mlx(tmp_path / "torch", tmp_path / "mlx")
    assert "auto_map" not in read_config(tmp_path / "mlx") and not (tmp_path / "mlx" / "modeling_dla.py").exists()
    mlx_to_torch(tmp_path / "mlx", tmp_path / "back")
    back, saved = read_config(tmp_path / "back"), read_config(tmp_path / "torch")
    assert back["auto_map"] == saved["auto_map"] and "model_file" not in back
    assert (tmp_path / "back" / "modeling_dla.py").read_text() == (tmp_path / "torch" / "modeling_dla.py").read_text()
    assert AutoConfig.from_pretrained(tmp_path / "back").to_dict() == model.config.to_dict()


def test_forward_refuses_arguments_it_would_ignore():
    model, ids = tiny("gdn"), torch.tensor([[3, 4, 5]])
    with pytest.raises(TypeError, match=r"forward does not take \['labels'\].*no loss"):
        model(ids, labels=ids)
    with pytest.raises(TypeError, match=r"does not take \['output_attentions'\]"):
        model(ids, output_attentions=True)
    assert torch.equal(model(ids, output_attentions=False, return_dict=True).logits, model(ids).logits)


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
    for loader in (AutoModelForCausalLM.from_pretrained, from_pretrained):
        if with_safetensors:
            assert torch.equal(loader(folder).lm_head.weight, model.lm_head.weight)
        else:
            with pytest.raises(FileNotFoundError, match=r"no model\*\.safetensors"):
                loader(folder)
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

CHOICES = [{"question": "the cache opens a", "choices": ["new", "pair"], "answer": 0},
           {"question": "merges the pair of least", "choices": ["density", "state", "text"], "answer": 0},
           {"question": "where the text", "choices": ["changes", "opens"], "answer": 1}]
TEXTS = ["the text changes and the cache opens a new state", "merges the pair"]
# Local tasks (lm-eval reads their documents through datasets' json loader): multiple choice, whose
# loglikelihood requests join question and choice with a space, and loglikelihood_rolling over whole texts.
TASKS = {"dla_tiny_choice": """
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list: [{metric: acc}]
""", "dla_tiny_rolling": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list: [{metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}]
"""}


@pytest.fixture(scope="module")
def eval_folder(tmp_path_factory):
    """A tiny Gated DeltaNet saved with a tokenizer (``model``), and the local tasks (``tasks``)."""
    folder = tmp_path_factory.mktemp("hf_eval")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(200)]
    tokenizer = make_tokenizer(folder / "tok", docs)
    save_pretrained(tiny("gdn", vocab_size=tokenizer.get_vocab_size()), folder / "model", tokenizer_dir=folder / "tok")
    (folder / "tasks").mkdir()
    (folder / "choice.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in CHOICES))
    (folder / "texts.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    for (name, body), data in zip(TASKS.items(), ["choice.jsonl", "texts.jsonl"]):
        (folder / "tasks" / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {folder / data}}}}}\n"
            f"test_split: test\n{body}")
    return folder


def reference(folder):
    """loglikelihood(context, continuation) -> (logprob, greedy) and rolling(text) -> logprob as lm-eval defines
    them, computed with dla_torch.evaluate.score in windows of 8 tokens: an empty context, and a rolling text's
    context, is the end-of-document token (the tokenizer has no beginning-of-sequence token)."""
    model, tokenizer, eos = load(folder)

    def loglikelihood(context, continuation):
        prefix = tokenizer.encode(context).ids if context else [eos]
        whole = tokenizer.encode(context + continuation).ids if context else prefix + tokenizer.encode(continuation).ids
        logprob, greedy = score(model, [whole], [len(prefix)], seq_len=8)
        return float(logprob[0]), bool(greedy[0])

    def rolling(text):
        return float(score(model, [[eos] + tokenizer.encode(text).ids], [1], seq_len=8)[0][0])

    return loglikelihood, rolling


def requests(kind, *arguments):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def test_lm_eval_hf_model_gives_the_loglikelihoods_and_greedy_text_computed_here(eval_folder):
    """In this process (dla_torch imported: no trust_remote_code needed)."""
    from lm_eval.models.huggingface import HFLM

    pairs = [(doc["question"], f" {choice}") for doc in CHOICES for choice in doc["choices"]] + [("", "the cache")]
    hf = HFLM(pretrained=str(eval_folder / "model"), device="cpu", batch_size=2)
    assert type(hf.model) is DLAGatedDeltaNetForCausalLM
    loglikelihood, rolling = reference(eval_folder / "model")
    got = hf.loglikelihood(requests("loglikelihood", *pairs), disable_tqdm=True)
    for pair, (logprob, greedy) in zip(pairs, got, strict=True):
        want, want_greedy = loglikelihood(*pair)
        assert logprob == pytest.approx(want, rel=1e-5) and greedy == want_greedy, pair
    texts = [(text,) for text in TEXTS]
    got = hf.loglikelihood_rolling(requests("loglikelihood_rolling", *texts), disable_tqdm=True)
    assert got == pytest.approx([rolling(text) for text in TEXTS], rel=1e-5)
    # greedy text up to the end-of-document token: dla_torch.generate's
    model, tokenizer, eos = load(eval_folder / "model")
    context = "the cache opens a new state where"
    prompt = torch.tensor([tokenizer.encode(context).ids])
    new = generate(model, prompt, 8, eos_id=eos)[0, prompt.shape[1]:].tolist()
    until = [(context, {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False})]
    assert hf.generate_until(requests("generate_until", *until), disable_tqdm=True) == \
        [tokenizer.decode(new[: new.index(eos)] if eos in new else new)]


def test_lm_eval_command_line_evaluates_a_saved_folder(eval_folder, tmp_path):
    """README's command, in a process that has not imported dla_torch (the folder's auto_map brings it), offline:
    the log-likelihoods it logs are the ones computed here."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={eval_folder / 'model'},trust_remote_code=True", "--tasks", ",".join(TASKS),
               "--include_path", str(eval_folder / "tasks"), "--device", "cpu", "--batch_size", "2",
               "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    samples = {name: sorted((json.loads(line) for line in next(out.rglob(f"samples_{name}_*.jsonl")).open()),
                            key=lambda sample: sample["doc_id"]) for name in TASKS}
    loglikelihood, rolling = reference(eval_folder / "model")
    for sample, doc in zip(samples["dla_tiny_choice"], CHOICES, strict=True):
        for (logprob, greedy), choice in zip(sample["filtered_resps"], doc["choices"], strict=True):
            want, want_greedy = loglikelihood(doc["question"], f" {choice}")
            assert float(logprob) == pytest.approx(want, rel=1e-5) and greedy == str(want_greedy), choice
    assert [float(sample["filtered_resps"][0]) for sample in samples["dla_tiny_rolling"]] == \
        pytest.approx([rolling(text) for text in TEXTS], rel=1e-5)


def test_saved_config_json_keeps_the_shared_keys_only(tmp_path):
    """What save_pretrained writes beside the shared fields is metadata that dla_shared's reader ignores."""
    model = tiny("mamba2")
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    extra = set(written) - set(model.config.to_dict())
    assert extra == {"architectures", "auto_map", "dtype", "transformers_version"}, extra
    assert written["architectures"] == ["DLAMamba2ForCausalLM"]
    assert written["auto_map"] == {"AutoConfig": "modeling_dla.DLAMamba2Config",
                                   "AutoModelForCausalLM": "modeling_dla.DLAMamba2ForCausalLM"}
