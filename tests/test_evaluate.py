"""Evaluation: perplexity and dla-eval against cross-entropy computed here, and the lm-eval adapter against
log-softmax computed here, down to an lm_eval.simple_evaluate run of a local task."""

import json
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F

from dla_shared import DLAConfig
from dla_torch.evaluate import load, main, perplexity, score
from dla_torch.generate import generate
from dla_torch.models import (
    DLAGatedDeltaNetConfig,
    DLAGatedDeltaNetForCausalLM,
    DLAMamba2Config,
    DLAMamba2ForCausalLM,
    save_pretrained,
)

from helpers import WORDS, make_tokenizer


def tiny(kind, vocab_size):
    torch.manual_seed(0)
    dla = DLAConfig(policy="dla", capacity=4)
    if kind == "mamba2":
        return DLAMamba2ForCausalLM(DLAMamba2Config(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                                    num_heads=4, head_dim=16, state_size=8, n_groups=2, dla=dla)).eval()
    return DLAGatedDeltaNetForCausalLM(DLAGatedDeltaNetConfig(vocab_size=vocab_size, hidden_size=32,
                                                              num_hidden_layers=2, num_heads=2, head_dim=8,
                                                              dla=dla)).eval()


def sentence(rng, low, high):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random DLA Gated DeltaNet saved with its tokenizer, and JSONL documents of 3 to 60 words."""
    folder = tmp_path_factory.mktemp("eval")
    rng = random.Random(0)
    docs = [sentence(rng, 3, 60) for _ in range(7)]
    tokenizer = make_tokenizer(folder / "tok", [sentence(rng, 5, 40) for _ in range(200)])
    save_pretrained(tiny("gdn", tokenizer.get_vocab_size()), folder / "model", tokenizer_dir=folder / "tok")
    (folder / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    return folder


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """(model, tokenizer) of the checkpoint."""
    return load(checkpoint / "model")[:2]


@pytest.fixture(scope="module")
def lm(checkpoint):
    """The adapter, with windows of 8 tokens so that every request crosses window boundaries."""
    pytest.importorskip("lm_eval")
    from dla_torch.lm_eval_adapter import DLALM

    return DLALM(pretrained=str(checkpoint / "model"), batch_size=2, device="cpu", seq_len=8)


def documents(checkpoint):
    return [json.loads(line)["text"] for line in (checkpoint / "docs.jsonl").read_text().splitlines()]


def eos(tokenizer):
    return tokenizer.token_to_id("<|endoftext|>")


@torch.no_grad()
def logprobs(model, ids):
    """log p(ids[j] | ids[:j]) for j = 1 .. len - 1, from one forward pass over the whole sequence: [len - 1]."""
    ids = torch.tensor(ids)
    return torch.log_softmax(model(ids[None]).logits[0, :-1], -1).gather(-1, ids[1:, None])[:, 0]


# -- perplexity -------------------------------------------------------------------------------------------

@torch.no_grad()
def test_perplexity_is_exp_of_the_cross_entropy_of_every_document(checkpoint, loaded):
    (model, tokenizer), docs = loaded, documents(checkpoint)
    total, count = 0.0, 0
    for doc in docs:
        ids = torch.tensor(tokenizer.encode(doc).ids + [eos(tokenizer)])
        total += F.cross_entropy(model(ids[None]).logits[0, :-1], ids[1:], reduction="sum").item()
        count += len(ids) - 1
    result = perplexity(model, tokenizer, docs, seq_len=16, batch_size=3, progress=False)
    assert result["tokens"] == count and result["documents"] == len(docs)
    assert max(len(tokenizer.encode(d).ids) for d in docs) > 16, "some document must need several windows"
    assert result["nll"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


@pytest.mark.parametrize("kind", ["mamba2", "gdn"])
def test_a_long_document_in_windows_scores_as_at_once(kind, loaded):
    tokenizer = loaded[1]
    model = tiny(kind, tokenizer.get_vocab_size())
    long = sentence(random.Random(1), 60, 60)
    short = ["the cache", "merges the pair"]
    n = len(tokenizer.encode(long).ids) + 1
    at_once = perplexity(model, tokenizer, [long], seq_len=n, batch_size=1, progress=False)
    for seq_len in (5, 32):
        windows = perplexity(model, tokenizer, [long], seq_len=seq_len, batch_size=1, progress=False)
        assert windows["nll"] == pytest.approx(at_once["nll"], rel=1e-5), f"seq_len={seq_len}"
    # In a batch with shorter documents (right padding) the long one scores the same too.
    alone = [perplexity(model, tokenizer, [d], seq_len=n, batch_size=1, progress=False) for d in [long, *short]]
    batch = perplexity(model, tokenizer, [long, *short], seq_len=9, batch_size=3, progress=False)
    assert (batch["tokens"] == sum(r["tokens"] for r in alone)
            == n - 1 + sum(len(tokenizer.encode(d).ids) for d in short))
    assert batch["nll"] * batch["tokens"] == pytest.approx(sum(r["nll"] * r["tokens"] for r in alone), rel=1e-5)


def test_perplexity_rejects_bad_arguments(loaded):
    with pytest.raises(ValueError, match="documents is empty"):
        perplexity(*loaded, [], progress=False)
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        perplexity(*loaded, ["the cache"], seq_len=0, progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        perplexity(*loaded, ["the cache"], batch_size=0, progress=False)


# -- dla-eval ---------------------------------------------------------------------------------------------

def test_dla_eval_prints_the_summary_and_writes_json(checkpoint, loaded, tmp_path, capsys):
    out = tmp_path / "result.json"
    assert main(["--model", str(checkpoint / "model"), "--data", str(checkpoint / "docs.jsonl"), "--seq-len", "16",
                 "--max-documents", "5", "--json", str(out)]) == 0
    expected = perplexity(*loaded, documents(checkpoint)[:5], seq_len=16, progress=False)
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(r"perplexity \d+\.\d\d \(nll \d+\.\d{3} nats/token\) over [\d,]+ tokens in 5 documents",
                        line), line
    assert f"{expected['perplexity']:.2f}" in line and f"{expected['tokens']:,} tokens" in line
    record = json.loads(out.read_text())
    assert record["documents"] == 5 and record["tokens"] == expected["tokens"]
    assert record["nll"] == pytest.approx(expected["nll"], rel=1e-6)


BAD_ARGUMENTS = {
    "missing-model-folder": (["--model", "{tmp}/nowhere"], "--model: {tmp}/nowhere is not a folder"),
    "folder-without-config": (["--model", "{tmp}"], "no config.json"),
    "missing-data-file": (["--data", "{tmp}/nowhere.jsonl"], "--data: data file {tmp}/nowhere.jsonl does not exist"),
    "unknown-data-format": (["--data", "{tmp}/docs.csv"], "--data: data files must all be one of"),
    "empty-text-file": (["--data", "{tmp}/empty.txt"], "--data: data file {tmp}/empty.txt has no text"),
    "empty-jsonl-file": (["--data", "{tmp}/empty.jsonl"], "--data: data file {tmp}/empty.jsonl has no text"),
    "missing-text-field": (["--text-field", "body"], "--data: .*docs.jsonl:1: no 'body' field"),
    "a-line-without-text": (["--data", "{tmp}/mixed.jsonl"], "--data: {tmp}/mixed.jsonl:3: no 'text' field"),
    "text-not-a-string": (["--data", "{tmp}/number.jsonl"], "--data: {tmp}/number.jsonl:1: 'text' is a int, "
                          "expected a string"),
    "broken-json": (["--data", "{tmp}/broken.jsonl"], "--data: {tmp}/broken.jsonl:2: not valid JSON"),
    "not-utf8-text": (["--data", "{tmp}/latin1.txt"], "--data: {tmp}/latin1.txt: not UTF-8 text"),
    "zero-seq-len": (["--seq-len", "0"], "--seq-len must be a positive integer"),
    "negative-max-documents": (["--max-documents", "-1"], "--max-documents must be a positive integer"),
}


@pytest.mark.parametrize("args, message", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_dla_eval_names_the_bad_argument(args, message, checkpoint, tmp_path, capsys):
    (tmp_path / "docs.csv").write_text("text\nthe cache\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "mixed.jsonl").write_text('{"text": "a"}\n\n{"body": "b"}\n')
    (tmp_path / "number.jsonl").write_text('{"text": 123}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": "b"\n')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    given = dict(zip(args[::2], args[1::2]))
    argv = {"--model": str(checkpoint / "model"), "--data": str(checkpoint / "docs.jsonl"), **given}
    with pytest.raises(SystemExit) as exit:
        main([a.replace("{tmp}", str(tmp_path)) for pair in argv.items() for a in pair])
    assert exit.value.code == 2
    assert re.search(message.replace("{tmp}", re.escape(str(tmp_path))), capsys.readouterr().err)


# -- the lm-eval adapter ----------------------------------------------------------------------------------

def requests(kind, *arguments):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def test_loglikelihood_is_a_sum_of_log_softmax(lm):
    tok, model = lm.text_tokenizer, lm.model
    pairs = [("the cache opens a new state where the text changes and", " merges the pair"),
             ("the cache", " opens"), ("", "the density of least pair")]
    results = lm.loglikelihood(requests("loglikelihood", *pairs), disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        if context:
            prefix, whole = tok.encode(context).ids, tok.encode(context + continuation).ids
        else:  # an empty context is the end-of-document token
            prefix = [eos(tok)]
            whole = prefix + tok.encode(continuation).ids
        assert whole[: len(prefix)] == prefix
        expected = logprobs(model, whole)[len(prefix) - 1 :]
        assert logprob == pytest.approx(expected.sum().item(), rel=1e-5), (context, continuation)
        assert logprob < 0 and len(whole) - len(prefix) == len(expected) >= 1


@torch.no_grad()
def test_loglikelihood_is_greedy_exactly_when_every_token_is_the_argmax(lm):
    context = lm.tok_encode("the text changes and the cache")
    picked = []
    for _ in range(3):  # the model's own greedy continuation, token by token
        picked.append(int(lm.model(torch.tensor([context + picked])).logits[0, -1].argmax()))
    other = (picked[-1] + 1) % lm.text_tokenizer.get_vocab_size()
    results = lm._loglikelihood_tokens([(("", ""), context, picked), (("", ""), context, picked[:-1] + [other])],
                                       disable_tqdm=True)
    assert [greedy for _, greedy in results] == [True, False]


def test_loglikelihood_rolling_scores_every_token_after_the_end_of_document_token(checkpoint, lm):
    texts = documents(checkpoint)[:2]
    results = lm.loglikelihood_rolling(requests("loglikelihood_rolling", *[(t,) for t in texts]), disable_tqdm=True)
    for text, result in zip(texts, results):
        ids = [eos(lm.text_tokenizer)] + lm.tok_encode(text)
        assert result == pytest.approx(logprobs(lm.model, ids).sum().item(), rel=1e-5)
        # dla_torch.evaluate.score, which perplexity() uses, gives the same in one window (seq_len 512).
        assert result == pytest.approx(float(score(lm.model, [ids], [1])[0][0]), rel=1e-6)


def test_generate_until_is_greedy_and_stops_at_the_until_string(lm):
    contexts = ["the cache opens a new state where", "the"]
    free = lm.generate_until(requests("generate_until", *[(c, {"until": [], "max_gen_toks": 12}) for c in contexts]),
                             disable_tqdm=True)
    for context, text in zip(contexts, free):  # left-padded batch == dla_torch.generate on each prompt alone
        ids = torch.tensor([lm.tok_encode(context)])
        eos_id = eos(lm.text_tokenizer)
        new = generate(lm.model, ids, 12, eos_id=eos_id)[0, ids.shape[1] :].tolist()
        assert text == lm.tok_decode(new[: new.index(eos_id)] if eos_id in new else new)
    text = free[0]  # stop at two letters that first appear after the text's start
    at = next(p for p in range(1, len(text) - 1) if text[p : p + 2].isalpha() and text.find(text[p : p + 2]) == p)
    cut = lm.generate_until(requests("generate_until", (contexts[0], {"until": ["<none>", text[at : at + 2]],
                                                                      "max_gen_toks": 12})), disable_tqdm=True)
    assert cut == [text[:at]]
    with pytest.raises(ValueError, match="unsupported generation argument"):
        lm.generate_until(requests("generate_until", (contexts[0], {"num_beams": 2})), disable_tqdm=True)


TASK = """
task: dla_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


def test_simple_evaluate_runs_a_local_task(checkpoint, lm, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub
    import lm_eval
    from lm_eval.tasks import TaskManager

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # both read the variables when imported
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    docs = [{"question": "the cache opens a", "choices": ["new", "pair"], "answer": 0},
            {"question": "merges the pair of least", "choices": ["density", "state", "text"], "answer": 0},
            {"question": "where the text", "choices": ["changes", "opens"], "answer": 1},
            {"question": "the", "choices": ["cache", "least"], "answer": 1}]
    (tmp_path / "docs.jsonl").write_text("\n".join(map(json.dumps, docs)) + "\n")
    (tmp_path / "task.yaml").write_text(TASK.format(data=tmp_path / "docs.jsonl", cache=tmp_path / "cache"))

    results = lm_eval.simple_evaluate(model="dla", model_args=f"pretrained={checkpoint / 'model'},seq_len=8",
                                      tasks=["dla_tiny_choice"], batch_size=2, device="cpu", bootstrap_iters=0,
                                      task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    right = []
    for doc in docs:  # lm_eval puts a space between the question and each choice
        context = lm.tok_encode(doc["question"])
        scores = [logprobs(lm.model, lm.tok_encode(f"{doc['question']} {c}"))[len(context) - 1 :].sum()
                  for c in doc["choices"]]
        right.append(int(torch.stack(scores).argmax()) == doc["answer"])
    assert results["results"]["dla_tiny_choice"]["acc,none"] == pytest.approx(sum(right) / len(docs))
