"""Evaluation: perplexity and dla-eval against cross-entropy computed here. (lm-eval runs the models through its
own ``hf`` model: tests/test_transformers.py.)"""

import json
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F

from dla_shared import DLAConfig
from dla_torch.evaluate import load, main, perplexity
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


def documents(checkpoint):
    return [json.loads(line)["text"] for line in (checkpoint / "docs.jsonl").read_text().splitlines()]


def eos(tokenizer):
    return tokenizer.token_to_id("<|endoftext|>")


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
    "unknown-device": (["--device", "gpu0"], "--device: Invalid device string: .gpu0."),
}
if not torch.cuda.is_available():  # the case exists only where CUDA does not (CI and the CPU machines)
    BAD_ARGUMENTS["cuda-without-cuda"] = (["--device", "cuda"], "--device cuda: torch sees no CUDA device here")


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
