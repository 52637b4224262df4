"""dla-calibrate and dla-inspect: per-head thresholds set for a target open rate on tiny random models of both
families (torch and MLX folders), the shipped model and an upcycled transformers Mamba-2; the statistics
checked against the oracle; bad input refused with a clear error."""

import json
import re
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Mamba2Config, Mamba2ForCausalLM

from dla_shared import DLAConfig, dla_attention
from dla_shared.hub import DEFAULT_MODEL
from dla_torch import calibrate as calibrate_cli
from dla_torch import inspect as inspect_cli
from dla_torch.boundaries import load_checkpoint, read_text, record_layer, save_thresholds, weights_layout
from dla_torch.calibrate import TOLERANCE, calibrate_folder
from dla_torch.inspect import inspect_model
from dla_torch.models import (
    DLAGatedDeltaNetConfig,
    DLAGatedDeltaNetForCausalLM,
    DLAMamba2Config,
    DLAMamba2ForCausalLM,
    from_pretrained,
    save_pretrained,
)
from dla_torch.models.base import dla_mixers
from dla_torch.models.upcycle import main as upcycle_cli

from helpers import make_tokenizer

VOCAB = 300
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "xe", "zu", "pa", "do"]


def documents(seed=0, count=3, lines=20) -> list[str]:
    """Lines of made-up words: a few hundred tokens per document."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(SYLLABLES, rng.integers(1, 4))) for _ in range(80)]
    line = lambda: " ".join(rng.choice(words, rng.integers(3, 10)))
    return ["\n".join(line() for _ in range(lines)) for _ in range(count)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two text files (one with two documents as a JSONL file, one plain text) and the documents."""
    folder = tmp_path_factory.mktemp("corpus")
    docs = documents()
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:2]))
    (folder / "b.txt").write_text(docs[2])
    return [str(folder / "a.jsonl"), str(folder / "b.txt")], docs


def spread(model):
    """Linear and embedding weights normal(0, 0.3), spread as a trained model's are: at a fresh init's 0.02
    every token scores alike, and a head's open rate jumps between extremes as its threshold passes that score."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(module.weight, std=0.3)
    return model


def tiny_model(kind, policy="dla"):
    """A random tiny DLA model (`spread`)."""
    torch.manual_seed(1)
    dla = DLAConfig(policy=policy, capacity=4, block_size=8)
    if kind == "mamba2":
        model = DLAMamba2ForCausalLM(DLAMamba2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                     num_heads=4, head_dim=16, state_size=8, n_groups=2, dla=dla))
    else:
        model = DLAGatedDeltaNetForCausalLM(DLAGatedDeltaNetConfig(vocab_size=VOCAB, hidden_size=32,
                                                                   num_hidden_layers=2, num_heads=2, head_dim=8,
                                                                   dla=dla))
    return spread(model).eval()


def save_with_tokenizer(model, folder, docs) -> str:
    save_pretrained(model, folder)
    make_tokenizer(folder, docs, VOCAB)
    return str(folder)


@pytest.fixture(scope="module")
def folders(corpus, tmp_path_factory):
    """Each family's tiny model as a torch folder and as an MLX folder (dla-convert's)."""
    from dla_mlx.convert import torch_to_mlx

    _, docs = corpus
    out = {}
    for kind in ("mamba2", "gdn"):
        torch_folder = save_with_tokenizer(tiny_model(kind), tmp_path_factory.mktemp(f"{kind}-torch"), docs)
        mlx_folder = tmp_path_factory.mktemp(f"{kind}-mlx")
        torch_to_mlx(torch_folder, mlx_folder)
        out[kind, "torch"], out[kind, "mlx"] = torch_folder, str(mlx_folder)
    return out


def mlx_measure(folder, text) -> tuple[np.ndarray, np.ndarray]:
    """The MLX model of ``folder``, run by MLX over the documents of ``text``: every layer's tau and open rates
    (each document's boundaries from the oracle on that layer's recorded op inputs): [layers, H] each."""
    from dla_mlx.convert import load
    from dla_mlx.inspect import trace_text
    from dla_mlx.models.base import dla_mixers as mlx_mixers

    model, _ = load(folder)
    tau = np.stack([np.array(mixer.tau) for mixer in mlx_mixers(model)])
    ids, cu = text.ids.tolist(), text.cu_seqlens.tolist()
    opened = [sum(trace_text(model, ids[s:e], layer).opened[0, 1:].sum(0) for s, e in zip(cu[:-1], cu[1:]))
              for layer in range(len(tau))]
    return tau, np.stack(opened) / text.scored_tokens


CALIBRATIONS = [pytest.param(kind, layout, rate, id=f"{kind}-{layout}-rate{rate}")
                for kind in ("mamba2", "gdn") for layout, rate in (("torch", 0.125), ("mlx", 0.25))]


@pytest.mark.parametrize("kind, layout, rate", CALIBRATIONS)
def test_calibration_reaches_the_rate_in_every_head_and_is_written_back(kind, layout, rate, folders, corpus,
                                                                       tmp_path):
    files, _ = corpus
    out = tmp_path / "calibrated"
    result = calibrate_folder(folders[kind, layout], files, rate, out, progress=False)
    assert np.all(np.abs(result.rates / rate - 1) <= TOLERANCE), f"rates {result.rates} for target {rate}"
    assert not result.missed
    assert result.tau.shape == (2, 4 if kind == "mamba2" else 2) and np.unique(result.tau).size > 1

    assert weights_layout(out) == layout, "the calibrated model keeps the layout it came in"
    assert json.loads((out / "config.json").read_text())["dla"]["threshold"] == 0.6, "config.json is left as is"
    if layout == "torch":
        loaded = np.stack([m.tau.numpy() for m in dla_mixers(from_pretrained(out))])
    else:
        loaded, rates = mlx_measure(out, result.text)
        np.testing.assert_array_equal(rates, result.rates, err_msg="the MLX model run by MLX")
    np.testing.assert_array_equal(loaded, result.tau)

    checkpoint = load_checkpoint(out)
    stats, _ = inspect_model(checkpoint, result.text, progress=False)
    measured = np.array([[head["open_rate"] for head in layer] for layer in stats])
    np.testing.assert_array_equal(measured, result.rates, err_msg="re-measuring the written model")


def test_inspect_json_rates_are_the_oracles_counts_and_the_png_is_drawn(folders, corpus, tmp_path, capsys):
    files, _ = corpus
    folder = tmp_path / "model"
    model = tiny_model("mamba2")
    for mixer, taus in zip(dla_mixers(model), ([0.25, 0.4, 0.6, 0.9], [0.3, 0.5, 0.7, 1.1])):
        mixer.tau.copy_(torch.tensor(taus))
    save_with_tokenizer(model, folder, corpus[1])
    out_json, out_png = tmp_path / "stats.json", tmp_path / "rates.png"
    argv = [str(folder), "--data", *files, "--json", str(out_json), "--png", str(out_png), "--text", "--layer", "1",
            "--head", "2"]
    assert inspect_cli.main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(out_json.read_text())
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    checkpoint = load_checkpoint(folder)
    text = read_text(files, checkpoint.tokenizer, checkpoint.eos_id, inspect_cli.DEFAULT_MAX_TOKENS)
    assert report["tokens"] == text.scored_tokens and report["documents"] == 3
    for layer, entry in enumerate(report["layers"]):
        x = record_layer(checkpoint.model, text, layer)
        _, state = dla_attention(x.q, x.k, x.v, x.g, None, x.beta, config=x.config, cu_seqlens=x.cu_seqlens,
                                 output_final_state=True)
        opened = state.opened.sum(0)
        assert [head["open_rate"] for head in entry["heads"]] == (opened / text.scored_tokens).tolist()
        assert [head["tau"] for head in entry["heads"]] == list(x.config.threshold)
        assert len(set(opened.tolist())) == len(opened), f"layer {layer}: heads should open at different rates"
        for head in entry["heads"]:
            assert head["score_q05"] <= head["score_q50"] <= head["score_q95"]
            assert 0 <= head["merge_share"] <= 1 and head["mean_span"] >= 1
        if layer == 1:  # --text: a '|' before every token that opened a state, each later document's first too
            marked = printed.split("('|' opens a state):")[1]
            assert marked.count("|") == opened[2] + len(text.cu_seqlens) - 2
    assert "open rate" in printed and "score 95%" in printed


def test_upcycled_transformers_mamba2_calibrates_in_one_step(corpus, tmp_path, capsys):
    files, docs = corpus
    torch.manual_seed(0)
    hf = spread(Mamba2ForCausalLM(Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8,
                                               expand=2, head_dim=8, num_heads=8, n_groups=2, conv_kernel=4)))
    source = tmp_path / "mamba2"
    hf.save_pretrained(source)
    make_tokenizer(source, docs, VOCAB)
    out = tmp_path / "dla"
    assert upcycle_cli([str(source), str(out), "--capacity", "4", "--calibrate-data", *files, "--rate", "0.125"]) == 0
    assert "within 10%" in capsys.readouterr().out
    checkpoint = load_checkpoint(out)
    text = read_text(files, checkpoint.tokenizer, checkpoint.eos_id)
    stats, _ = inspect_model(checkpoint, text, progress=False)
    rates = np.array([[head["open_rate"] for head in layer] for layer in stats])
    assert np.all(np.abs(rates / 0.125 - 1) <= TOLERANCE), rates


def test_the_shipped_model_calibrates_to_a_requested_rate(tmp_path):
    """Most heads of the shipped model reach a requested rate. A head whose open rate jumps across the target
    (a boundary makes the next score large, so just below some threshold every boundary triggers the next)
    cannot: calibration keeps its closest threshold and names it (dla-calibrate then exits 1)."""
    data = tmp_path / "textwrap.txt"
    data.write_text(Path(textwrap.__file__).read_text())  # Python source, as the model was trained on
    before = (DEFAULT_MODEL / "model.safetensors").read_bytes()
    result = calibrate_folder(DEFAULT_MODEL, [data], 0.25, out=tmp_path / "out", max_tokens=300, progress=False)
    assert (DEFAULT_MODEL / "model.safetensors").read_bytes() == before, "--out leaves the shipped model alone"
    missed = set(result.missed)
    assert len(missed) <= 3, result.table()  # of 16 heads
    reached = [result.rates[l, h] for l in range(4) for h in range(4) if (l, h) not in missed]
    assert np.all(np.abs(np.array(reached) / 0.25 - 1) <= TOLERANCE)
    tau = np.stack([m.tau.numpy() for m in dla_mixers(from_pretrained(tmp_path / "out"))])
    np.testing.assert_array_equal(tau, result.tau)


def test_calibrate_writes_in_place_without_out(folders, corpus, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(folders["gdn", "torch"], folder)
    assert calibrate_cli.main([str(folder), "--data", *corpus[0], "--rate", "0.25", "--steps", "12"]) == 0
    assert f"no --out: the thresholds will be written into {folder} itself" in capsys.readouterr().out
    assert not np.allclose(load_checkpoint(folder).thresholds(), 0.6)


@pytest.fixture
def bad_inputs(corpus, tmp_path):
    empty, blank = tmp_path / "empty.txt", tmp_path / "blank.jsonl"
    empty.write_text("")
    blank.write_text(json.dumps({"text": "  \n "}) + "\n")
    fenwick = save_with_tokenizer(tiny_model("gdn", policy="fenwick"), tmp_path / "fenwick", corpus[1])
    torch.manual_seed(0)
    mamba2 = tmp_path / "plain-mamba2"
    Mamba2ForCausalLM(Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, state_size=8, expand=2,
                                   head_dim=8, num_heads=8, n_groups=2)).save_pretrained(mamba2)
    return {"empty": str(empty), "blank": str(blank), "fenwick": fenwick, "mamba2": str(mamba2)}


BAD_CALIBRATIONS = {
    "rate-zero": (lambda f, x: [f, "--data", *x["data"], "--rate", "0"], r"--rate must be in \(0, 1\), got 0.0"),
    "rate-above-one": (lambda f, x: [f, "--data", *x["data"], "--rate", "1.5"], r"--rate must be in \(0, 1\), got 1.5"),
    "empty-file": (lambda f, x: [f, "--data", x["empty"], "--rate", "0.1"],
                   r"--data: data file .*empty.txt has no text"),
    "blank-jsonl": (lambda f, x: [f, "--data", x["blank"], "--rate", "0.1"],
                    r"--data: data file .*blank.jsonl has no text"),
    "not-dla": (lambda f, x: [x["mamba2"], "--data", *x["data"], "--rate", "0.1"],
                r"model_type 'mamba2', not a DLA model"),
    "not-dla-policy": (lambda f, x: [x["fenwick"], "--data", *x["data"], "--rate", "0.1"],
                       r"uses policy 'fenwick'; boundary thresholds exist only under policy 'dla'"),
    "hub-id-without-out": (lambda f, x: ["someone/some-model", "--data", *x["data"], "--rate", "0.1"],
                           r"--out is needed: someone/some-model is not a local folder"),
    # --out may not overwrite another model (once it did, silently, through copytree), nor be a file
    "out-another-model": (lambda f, x: [f, "--data", *x["data"], "--rate", "0.1", "--out", x["fenwick"]],
                          r"--out: out '.*fenwick' is not empty; choose a new folder"),
    "out-a-file": (lambda f, x: [f, "--data", *x["data"], "--rate", "0.1", "--out", x["empty"]],
                   r"--out: out '.*empty.txt' is a file"),
}


@pytest.mark.parametrize("case", list(BAD_CALIBRATIONS))
def test_calibrate_refuses_bad_input_clearly(case, bad_inputs, folders, corpus, capsys):
    make_argv, message = BAD_CALIBRATIONS[case]
    other = {f.name: f.read_bytes() for f in Path(bad_inputs["fenwick"]).iterdir()}
    with pytest.raises(SystemExit) as exit_:
        calibrate_cli.main(make_argv(folders["gdn", "torch"], {**bad_inputs, "data": corpus[0]}))
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert {f.name: f.read_bytes() for f in Path(bad_inputs["fenwick"]).iterdir()} == other  # left as it was


@pytest.mark.parametrize("argv, message", [
    (["--layer", "2"], r"--layer must be in \[0, 2\), got 2"),
    (["--head", "-1"], r"--head must be in \[0, 2\), got -1"),
])
def test_inspect_refuses_a_layer_or_head_out_of_range(argv, message, folders, corpus, capsys):
    with pytest.raises(SystemExit):
        inspect_cli.main([folders["gdn", "torch"], "--data", *corpus[0], "--text", *argv])
    assert re.search(message, capsys.readouterr().err)


def test_upcycle_refuses_a_rate_without_data(tmp_path, capsys):
    with pytest.raises(SystemExit):
        upcycle_cli([str(tmp_path), str(tmp_path / "out"), "--rate", "0.1"])
    assert "--calibrate-data and --rate go together" in capsys.readouterr().err


def test_upcycle_checks_its_calibration_data_before_writing(bad_inputs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        upcycle_cli([bad_inputs["mamba2"], str(tmp_path / "out"), "--calibrate-data", "nope.txt", "--rate", "0.1"])
    assert "--calibrate-data: no such file: nope.txt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_thresholds_go_into_sharded_weights_beside_each_layers_L(folders, tmp_path):
    """A checkpoint made before tau, in two shards with an index: each layer's tau is written into the shard
    that holds its L, and the index names it."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "sharded"
    shutil.copytree(folders["mamba2", "torch"], folder)
    weights = {k: v for k, v in load_file(folder / "model.safetensors").items() if not k.endswith(".tau")}
    (folder / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in weights.items() if ".layers.1." not in k},
              "model-00002-of-00002.safetensors": {k: v for k, v in weights.items() if ".layers.1." in k}}
    for name, tensors in shards.items():
        save_file(tensors, folder / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, tensors in shards.items() for k in tensors}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    checkpoint = load_checkpoint(folder)
    np.testing.assert_array_equal(checkpoint.thresholds(), np.float32(0.6))  # filled from the config
    taus = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]], np.float32)
    for mixer, tau in zip(dla_mixers(checkpoint.model), taus):
        mixer.tau.copy_(torch.from_numpy(tau))
    save_thresholds(checkpoint, tmp_path / "out")

    weight_map = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    for layer in range(2):
        name = f"backbone.layers.{layer}.mixer.tau"
        assert weight_map[name] == weight_map[f"backbone.layers.{layer}.mixer.L"]
        assert name in load_file(tmp_path / "out" / weight_map[name])
    np.testing.assert_array_equal(load_checkpoint(tmp_path / "out").thresholds(), taus)
    assert not any(k.endswith(".tau") for k in load_file(folder / "model-00001-of-00002.safetensors")), \
        "--out leaves the source alone"
