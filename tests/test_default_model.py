"""The model shipped with the package (`dla_shared.hub.DEFAULT_MODEL`): its files are what the recorded command
made, it loads in both backends with the same logits, and `dla-generate` runs on it from a clean install."""

import hashlib
import json
import platform
import re
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from dla_mlx import load
from dla_mlx.generate import main as generate
from dla_mlx.models.base import dla_mixers as mlx_mixers
from dla_shared.hub import DEFAULT_MODEL
from dla_torch.models import from_pretrained
from dla_torch.models.base import dla_mixers
from dla_torch.models.hub import model_types

from helpers import load_script

MANIFEST = json.loads((DEFAULT_MODEL / "manifest.json").read_text())
PROMPT = "import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n"


def test_files_are_the_recorded_ones():
    # pip byte-compiles the folder's modeling_dla.py (the remote code transformers loads) into __pycache__
    files = [p.name for p in DEFAULT_MODEL.iterdir() if p.name not in ("manifest.json", "__pycache__")]
    assert sorted(MANIFEST["sha256"]) == sorted(files)
    for name, digest in MANIFEST["sha256"].items():
        assert hashlib.sha256((DEFAULT_MODEL / name).read_bytes()).hexdigest() == digest, name
    assert (DEFAULT_MODEL / "model.safetensors").stat().st_size <= 20 * 2**20


@pytest.mark.parametrize("damage", ["flipped byte", "missing file"])
@pytest.mark.parametrize("loader", [from_pretrained, load], ids=["torch", "mlx"])
def test_a_damaged_copy_is_refused_naming_the_file(loader, damage, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, folder)
    weights = folder / "model.safetensors"
    if damage == "missing file":
        weights.unlink()
        error, match = FileNotFoundError, "model.safetensors is missing; .*manifest.json lists it"
    else:
        data = bytearray(weights.read_bytes())
        data[-100] ^= 1  # one bit of one weight: the file still parses
        weights.write_bytes(bytes(data))
        error, match = ValueError, "model.safetensors does not match its SHA-256 in .*manifest.json"
    with pytest.raises(error, match=match):
        loader(folder)
    (folder / "manifest.json").unlink()
    if damage == "flipped byte":  # without a manifest nothing is checked
        loader(folder)


def test_config_is_the_recorded_training_config():
    """config.json is the model section of the recorded dla-train config, through the config class, and the
    auto_map that transformers' Auto classes follow with trust_remote_code."""
    model = dict(MANIFEST["train_config"]["model"])
    cls = model_types()[model.pop("type")]
    shipped = json.loads((DEFAULT_MODEL / "config.json").read_text())
    config = cls.config_class.from_dict({**model, "vocab_size": shipped["vocab_size"]})
    assert shipped.pop("auto_map") == config.auto_map  # the remote code (modeling_dla.py) transformers loads
    assert config.to_dict() == shipped
    assert shipped["dla"]["policy"] == "dla"


same_corpus = pytest.mark.skipif(platform.python_version() != MANIFEST["python"],
                                 reason="the corpus is this Python's standard library; another version has other files")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """What `scripts/prepare_tiny.py --out data/stdlib` makes: the model's training and validation files."""
    out = tmp_path_factory.mktemp("stdlib")
    assert load_script("prepare_tiny").main(["--out", str(out)]) == 0
    return out


@same_corpus
def test_tokenizer_is_what_prepare_tiny_makes(corpus):
    assert (corpus / "tokenizer" / "tokenizer.json").read_text() == (DEFAULT_MODEL / "tokenizer.json").read_text()


@same_corpus
def test_boundaries_follow_the_target_rate_on_unseen_text(corpus):
    """On the validation files (text the model did not train on), read as it trained (sequences of 256 tokens,
    here 16 spread evenly over the files), every layer opens states at a rate within a factor of 2 of the
    target its thresholds were trained to, and no head at more than half of the tokens."""
    model = from_pretrained(DEFAULT_MODEL)
    tokenizer = Tokenizer.from_file(str(DEFAULT_MODEL / "tokenizer.json"))
    documents = [json.loads(line)["text"] for line in (corpus / "valid.jsonl").read_text().splitlines()]
    ids = np.concatenate([tokenizer.encode(text).ids for text in documents])
    rows, length = 16, 256
    starts = np.arange(rows) * (len(ids) // rows)
    cache = model.make_cache()
    with torch.no_grad():
        model(torch.from_numpy(np.stack([ids[s : s + length] for s in starts])), cache=cache)
    target = model.config.dla.target_rate
    for layer in cache:
        rate = layer.state.opened.sum(0).double() / (rows * (length - 1))
        assert target / 2 <= rate.mean() <= 2 * target and rate.max() <= 0.5, rate


def test_the_model_learned_its_corpus():
    """Validation loss well below a uniform guess over the vocabulary (ln 2048 = 7.6 nats)."""
    vocab = json.loads((DEFAULT_MODEL / "config.json").read_text())["vocab_size"]
    assert MANIFEST["valid_loss"] < 0.6 * np.log(vocab)


def test_torch_and_mlx_give_the_same_logits():
    """Both backends load the shipped model, with the same thresholds (its config's, if its weights have none)."""
    model, tokenizer = load(DEFAULT_MODEL)
    torch_model = from_pretrained(DEFAULT_MODEL)
    ids = tokenizer.encode(PROMPT)
    logits_mlx = np.array(model(mx.array([ids])).astype(mx.float32))
    with torch.no_grad():
        logits_torch = torch_model(torch.tensor([ids])).logits.numpy()
    err = np.abs(logits_mlx - logits_torch).max() / np.abs(logits_torch).max()
    assert err < 1e-4, err
    taus = [np.array(m.tau) for m in mlx_mixers(model)]
    np.testing.assert_array_equal(taus, [m.tau.numpy() for m in dla_mixers(torch_model)])
    if not any(name.endswith(".tau") for name in load_file(DEFAULT_MODEL / "model.safetensors")):
        config = torch_model.config
        assert all(np.array_equal(tau, np.float32(config.dla.thresholds(config.num_heads))) for tau in taus)


def test_loading_asks_nothing():
    """The folder names its modeling code for transformers' Auto classes; `dla_mlx.load` loads the model from the
    package, so transformers must not stop to ask whether to run that code (it would wait for an answer). In a
    fresh process: importing dla_torch registers the model type with transformers, which hides the question."""
    code = ("import builtins, sys\n"
            "builtins.input = lambda prompt='': sys.exit('asked: ' + prompt[-60:])\n"
            "from dla_mlx import load\nfrom dla_shared.hub import DEFAULT_MODEL\nload(DEFAULT_MODEL)\n"
            "assert 'dla_torch' not in sys.modules\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_dla_generate_streams_from_the_default_model(tmp_path, capsys):
    plot = tmp_path / "boundaries.png"
    assert generate(["--prompt", PROMPT, "-m", "12", "--boundaries", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "Generation: 12 tokens" in out and "Prompt:" in out
    assert plot.read_bytes()[:4] == b"\x89PNG"


BAD_GENERATE = {
    "negative-temp": (["--temp", "-1"], "--temp must be a finite number >= 0, got -1.0"),
    "nan-temp": (["--temp", "nan"], "--temp must be a finite number >= 0, got nan"),
    "zero-top-p": (["--top-p", "0"], r"--top-p must be in \(0, 1\], got 0.0"),
    "negative-top-k": (["--top-k", "-2"], "--top-k must be >= 0, got -2"),
    "head-out-of-range": (["--boundaries", "b.png", "--boundaries-head", "99"],
                          "--boundaries-head 99: the model has 4 layers of 4 heads"),
    "not-utf8-prompt": (["--prompt", "caf\udce9"], "--prompt is not UTF-8 text"),
    "missing-model": (["--model", "./nowhere"], "--model ./nowhere: no such folder"),
}


@pytest.mark.parametrize("args, message", BAD_GENERATE.values(), ids=BAD_GENERATE.keys())
def test_dla_generate_refuses_bad_arguments_before_generating(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        generate(["-m", "3", *args])
    captured = capsys.readouterr()
    assert exit.value.code == 2 and re.search(message, captured.err), captured.err
    assert "Generation:" not in captured.out


def test_dla_generate_from_an_empty_prompt_starts_a_document(capsys):
    assert generate(["--prompt", "", "-m", "5"]) == 0
    assert "Prompt: 1 tokens" in capsys.readouterr().out
