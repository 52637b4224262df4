"""The training program: a tiny run learns; DDP and FSDP2 equal one process; resume equals no stop; the
thresholds follow the target rate alike on every rank."""

import json
import random
import re
import subprocess
import sys

import pytest
import torch

from dla_torch.data import PackedTokens, load_tokenizer
from dla_torch.models import from_pretrained
from dla_torch.models.base import dla_mixers
from dla_torch.train import DEFAULTS, Trainer, load_config, lr_factor, main

from helpers import WORDS, make_tokenizer

# dla-train, then every rank saves its thresholds (checkpoints and the export hold rank 0's only).
TRAIN_AND_SAVE_TAU = """
import sys
import torch
import torch.distributed as dist
from dla_torch.models.base import dla_mixers
from dla_torch.train import Trainer, load_config
trainer = Trainer(load_config(None, sys.argv[2::2]))
trainer.fit()
torch.save(torch.stack([m.tau for m in dla_mixers(trainer.model)]), trainer.out / f"tau_rank{trainer.rank}.pt")
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Random word documents as JSONL (train, valid) and a byte-level BPE tokenizer trained on them."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(300)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[:270]))
    (folder / "valid.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[270:]))
    make_tokenizer(folder / "tok", docs)
    return folder


def settings(corpus, out, **train):
    """--set overrides of a tiny DLA Mamba-2 run."""
    base = {"out": str(out), "data.tokenizer": str(corpus / "tok"), "data.train": [str(corpus / "train.jsonl")],
            "data.valid": [str(corpus / "valid.jsonl")], "model.type": "dla_mamba2", "model.hidden_size": 32,
            "model.num_hidden_layers": 2, "model.num_heads": 4, "model.head_dim": 16, "model.state_size": 8,
            "model.dla.capacity": 6, "train.seq_len": 64, "train.micro_batch": 1, "train.steps": 4,
            "train.warmup": 2, "train.log_every": 1, "train.eval_every": 100, "train.save_every": 100}
    base.update({f"train.{k}": v for k, v in train.items()})
    return [f"{key}={json.dumps(value)}" for key, value in base.items()]


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def boundary_rates(out):
    return [r["boundary_rate"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def thresholds(model):
    """Every layer's tau: [layers, H]."""
    return torch.stack([mixer.tau for mixer in dla_mixers(model)])


def run(args, processes=1, script=None):
    """dla-train (or ``script``, which takes the same ``--set`` arguments), in one process or under torchrun."""
    program = [str(script)] if script else ["-m", "dla_torch.train"]
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(processes)] if processes > 1 else []
    command = [sys.executable, *launcher, *program] + [a for s in args for a in ("--set", s)]
    subprocess.run(command, check=True, capture_output=True, text=True)


def test_tiny_run_learns_and_exports_a_loadable_model(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(sum((["--set", s] for s in settings(corpus, out, steps=30, lr=3e-3, eval_every=10)), [])) == 0
    history = losses(out)
    assert len(history) == 30 and sum(history[-5:]) / 5 < sum(history[:5]) / 5 - 0.5
    valid = [r["valid_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "valid_loss" in r]
    assert len(valid) == 3 and valid[-1] < valid[0]
    rates = boundary_rates(out)
    assert all(len(r[stat]) == 2 for r in rates for stat in ("mean", "min", "max"))
    assert all(0 <= low <= mean <= high <= 1 for r in rates for low, mean, high in zip(r["min"], r["mean"], r["max"]))
    model = from_pretrained(out / "model")
    assert (out / "model" / "tokenizer.json").exists()
    printed = capsys.readouterr()
    assert "trained 30 steps" in printed.out and "rate=" in printed.err  # the progress bar's rate summary
    ids = torch.randint(0, 300, (1, 20))
    assert model(ids).logits.shape == (1, 20, model.config.vocab_size)


def test_two_processes_equal_one_with_the_same_global_batch(corpus, tmp_path):
    script = tmp_path / "train_and_save_tau.py"
    script.write_text(TRAIN_AND_SAVE_TAU)
    run(settings(corpus, tmp_path / "one", grad_accum=2))
    run(settings(corpus, tmp_path / "ddp"), processes=2, script=script)
    run(settings(corpus, tmp_path / "fsdp", parallel="fsdp"), processes=2, script=script)
    one = losses(tmp_path / "one")
    assert len(one) == 4
    torch.testing.assert_close(losses(tmp_path / "ddp"), one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses(tmp_path / "fsdp"), one, rtol=1e-5, atol=1e-6)
    for name in ("ddp", "fsdp"):
        a, b = from_pretrained(tmp_path / "one" / "model"), from_pretrained(tmp_path / name / "model")
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)
        rank0, rank1 = (torch.load(tmp_path / name / f"tau_rank{r}.pt") for r in (0, 1))
        torch.testing.assert_close(rank1, rank0, rtol=0, atol=0)  # every rank holds the same thresholds
        torch.testing.assert_close(rank0, thresholds(a), rtol=1e-6, atol=0)
        assert (thresholds(b) == rank0).all()
    assert (thresholds(a) != torch.tensor(0.6)).all()  # they moved


def test_resumed_run_continues_like_an_uninterrupted_one(corpus, tmp_path):
    run(settings(corpus, tmp_path / "whole", steps=6, save_every=3))
    run(settings(corpus, tmp_path / "parts", steps=6, stop_at=3))  # a job that hits its time limit
    assert not (tmp_path / "parts" / "model").exists()
    run(settings(corpus, tmp_path / "parts", steps=6))  # resumes from step 3
    whole, parts = losses(tmp_path / "whole"), losses(tmp_path / "parts")
    assert len(parts) == 6
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-7)
    tau = [thresholds(from_pretrained(tmp_path / name / "model")) for name in ("whole", "parts")]
    torch.testing.assert_close(tau[1], tau[0], rtol=0, atol=0)
    assert (tau[0] != torch.tensor(0.6)).all()
    records = (tmp_path / "parts" / "metrics.jsonl").read_text()
    assert '"event": "resumed", "step": 3' in records


def test_packed_rows_mark_documents(corpus):
    tokenizer = load_tokenizer(corpus / "tok")
    eos = tokenizer.token_to_id("<|endoftext|>")
    rows = PackedTokens(["a b", "the cache", "opens a new state"], tokenizer, eos, 6)
    ids, labels, cu = rows.row(0)
    starts = cu[1:-1]
    assert cu[0] == 0 and cu[-1] == 6 and (ids[0, starts - 1] == eos).all()
    assert (labels[0, starts - 1] == -100).all() and labels[0, -1] == -100
    inside = [t for t in range(5) if t + 1 not in starts.tolist()]
    assert (labels[0, inside] == ids[0, [t + 1 for t in inside]]).all()


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_learning_rate_schedules(schedule):
    t = dict(DEFAULTS["train"], schedule=schedule, warmup=10, steps=110, min_lr_ratio=0.1, decay_fraction=0.2)
    assert lr_factor(0, t) == pytest.approx(0.1) and lr_factor(9, t) == pytest.approx(1.0)
    assert lr_factor(110, t) == pytest.approx(0.1)
    if schedule == "wsd":
        assert lr_factor(87, t) == 1.0 and lr_factor(99, t) == pytest.approx(1 - 0.9 * 11 / 22)
    else:
        assert lr_factor(60, t) == pytest.approx(0.55)


def test_config_errors_name_the_field(corpus, tmp_path):
    good = settings(corpus, tmp_path)
    with pytest.raises(ValueError, match=r"unknown config field trian"):
        load_config(None, good + ["trian.steps=3"])
    with pytest.raises(ValueError, match=r"train.schedule must be 'cosine' or 'wsd'"):
        load_config(None, good + ["train.schedule=linear"])
    with pytest.raises(ValueError, match=r"--set expects key=value"):
        load_config(None, good + ["train.steps"])
    with pytest.raises(ValueError, match=r"model.type must be one of"):
        load_config(None, good + ["model.type=gpt2"])
    for eta in (0, -0.1, float("inf"), "fast"):
        with pytest.raises(ValueError, match=r"train.tau_eta must be a finite number > 0 \(the threshold"):
            load_config(None, good + [f"train.tau_eta={json.dumps(eta)}"])
    for setting, message in [("train.lr=abc", "train.lr must be a finite number > 0, got 'abc'"),
                             ("train.log_every=0", "train.log_every must be a positive integer, got 0"),
                             ("train.eval_rows=0", "train.eval_rows must be a positive integer, got 0"),
                             ("train.warmup=-5", "train.warmup must be an integer >= 0, got -5"),
                             ("train.betas=0.9", r"train.betas must be two numbers in \[0, 1\) \(AdamW's\), got 0.9"),
                             ("train.min_lr_ratio=2", r"train.min_lr_ratio must be a number in \[0, 1\], got 2"),
                             ("train.clip=abc", "train.clip must be a finite number > 0"),
                             ("train=5", "train must be an object of fields, got 5"),
                             ("data.valid_fraction=2", r"data.valid_fraction must be a number in \[0, 1\), got 2"),
                             (f"out={json.dumps(str(corpus / 'train.jsonl'))}", "is a file; expected a folder")]:
        with pytest.raises(ValueError, match=message):
            load_config(None, good + [setting])
    for name in ("deterministic", "compile"):
        with pytest.raises(ValueError, match=rf"train.{name} must be true or false, got 'False'"):
            load_config(None, good + [f"train.{name}=False"])  # not JSON: the string 'False', which is truthy
    with pytest.raises(ValueError, match=r"data.eos_token '<eos>' is not in the tokenizer"):
        Trainer(load_config(None, good + ["data.eos_token=<eos>"]))


def test_activation_checkpointing_changes_memory_not_results(corpus, tmp_path):
    results, taus = [], []
    for recompute in (False, True):
        args = settings(corpus, tmp_path / str(recompute), steps=3, activation_checkpointing=recompute)
        trainer = Trainer(load_config(None, args))
        assert trainer.model.activation_checkpointing is recompute
        results.append([trainer.train_step() for _ in range(3)])
        taus.append(thresholds(trainer.model))
    for before, after in zip(*results):
        torch.testing.assert_close(after["loss"], before["loss"], rtol=1e-6, atol=1e-7)
        assert after["boundary_rate"] == before["boundary_rate"]
    torch.testing.assert_close(taus[1], taus[0], rtol=0, atol=0)


def test_deterministic_run_uses_deterministic_algorithms(corpus, tmp_path):
    """train.deterministic switches torch to its deterministic kernels (on CUDA, for the chunk path's index_add
    and the reference's scatter_add; torch raises where an op has none): every op of a training step has one,
    and two runs give the same losses bit for bit."""
    results = []
    try:
        for name in ("a", "b"):
            trainer = Trainer(load_config(None, settings(corpus, tmp_path / name, steps=3, deterministic=True)))
            assert torch.are_deterministic_algorithms_enabled()
            results.append([trainer.train_step()["loss"] for _ in range(3)])
    finally:
        torch.use_deterministic_algorithms(False)
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


def test_thresholds_follow_the_target_rate(corpus, tmp_path):
    """A high target rate lowers the thresholds, a low one raises them, and the measured rate approaches
    each target; the exported model carries the final thresholds."""
    tau = {}
    for target in (0.05, 0.5):
        args = settings(corpus, tmp_path / str(target), steps=16, tau_eta=0.5) + [f"model.dla.target_rate={target}"]
        trainer = Trainer(load_config(None, args))
        rates = [sum(r["mean"]) / len(r["mean"]) for r in (trainer.train_step()["boundary_rate"] for _ in range(16))]
        assert abs(sum(rates[-5:]) / 5 - target) < abs(rates[0] - target) / 2, rates  # noisy from step to step
        tau[target] = thresholds(trainer.model)
        trainer.export()
        torch.testing.assert_close(thresholds(from_pretrained(tmp_path / str(target) / "model")), tau[target],
                                   rtol=0, atol=0)
    assert (tau[0.5] < tau[0.05]).all(), tau


def test_thresholds_stay_fixed_without_a_target_rate(corpus, tmp_path):
    trainer = Trainer(load_config(None, settings(corpus, tmp_path) + ["model.dla.target_rate=null"]))
    records = [trainer.train_step() for _ in range(3)]
    assert (thresholds(trainer.model) == torch.tensor(0.6)).all()
    assert all(len(r["boundary_rate"]["mean"]) == 2 for r in records)  # the rates are still measured


def test_packed_rows_cut_into_sequences_of_the_context(corpus):
    """A row of micro_batch x seq_len tokens holds micro_batch sequences: cuts every seq_len tokens, besides
    the document starts, and no label crosses a cut."""
    tokenizer = load_tokenizer(corpus / "tok")
    eos = tokenizer.token_to_id("<|endoftext|>")
    documents = ["the cache opens a new state where the text changes " * 3] * 2
    whole, cut = (PackedTokens(documents, tokenizer, eos, 12, context=context) for context in (None, 4))
    for index in range(len(cut)):
        ids, labels, cu = cut.row(index)
        ids_whole, _, cu_whole = whole.row(index)
        assert torch.equal(ids, ids_whole)
        assert set(cu.tolist()) == set(cu_whole.tolist()) | {0, 4, 8, 12}
        assert (labels[0, cu[1:] - 1] == -100).all()


def test_resume_refuses_a_changed_config(corpus, tmp_path):
    out = tmp_path / "run"
    assert main(sum((["--set", s] for s in settings(corpus, out, stop_at=2)), [])) == 0
    for change, shown in [(["train.lr=0.1"], "train.lr: 0.001 -> 0.1"),
                          (["train.seq_len=32"], "train.seq_len: 64 -> 32"),
                          (['model.dla.policy="fenwick"'], "model.dla.policy: 'dla' -> 'fenwick'")]:
        with pytest.raises(ValueError, match=re.escape(shown)):
            Trainer(load_config(None, settings(corpus, out) + change))
    assert Trainer(load_config(None, settings(corpus, out, eval_every=7))).step == 2  # a resumable field
    assert Trainer(load_config(None, settings(corpus, out, resume=False) + ["train.lr=0.1"])).step == 0


def test_the_summary_line_says_how_the_run_ended_and_starting_over_sets_the_old_run_aside(corpus, tmp_path, capsys):
    """stop_at names the checkpoints, not a model it did not write; rerunning a finished run trains nothing
    and says so; train.resume=false moves the previous run's files aside instead of mixing its metrics with
    the new run's and leaving its checkpoints for a later resume to find."""
    out = tmp_path / "run"
    cli = lambda **train: main(sum((["--set", s] for s in settings(corpus, out, **train)), []))
    assert cli(stop_at=2) == 0
    assert "stopped at step 2 of 4 (train.stop_at)" in capsys.readouterr().out and not (out / "model").exists()
    assert cli() == 0
    assert "trained 4 steps" in capsys.readouterr().out
    assert cli() == 0
    assert "holds a finished run of 4 steps: nothing to train" in capsys.readouterr().out
    old_metrics = (out / "metrics.jsonl").read_text()
    assert cli(steps=3, resume=False) == 0
    printed = capsys.readouterr()
    assert "trained 3 steps" in printed.out
    assert "the previous run's checkpoints, metrics.jsonl, model moved to" in printed.err
    aside, = out.glob("previous-*")
    assert (aside / "metrics.jsonl").read_text() == old_metrics and (aside / "checkpoints" / "step_4").is_dir()
    assert len(losses(out)) == 3  # the new run's steps only
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_3"]


def test_resume_falls_back_to_the_newest_complete_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    assert main(sum((["--set", s] for s in settings(corpus, out, save_every=1, stop_at=3)), [])) == 0
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_3"
    (checkpoints / "step_3" / "trainer.json").unlink()  # a crash before the checkpoint was complete
    (checkpoints / "latest").write_text("")  # and one while `latest` was written (no longer possible)
    assert Trainer(load_config(None, settings(corpus, out))).step == 2
    for file in (checkpoints / "step_2").glob("*.distcp"):
        file.write_bytes(file.read_bytes()[:10])  # damaged weights
    with pytest.warns(UserWarning, match="step_2 does not load"):
        assert Trainer(load_config(None, settings(corpus, out))).step == 1


def test_empty_training_data_is_a_clear_error(corpus, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    args = settings(corpus, tmp_path / "run") + [f"data.train={json.dumps([str(tmp_path / 'empty.jsonl')])}"]
    with pytest.raises(SystemExit):
        main(sum((["--set", s] for s in args), []))
    assert re.search(r"dla-train: error: data file .*empty\.jsonl has no text", capsys.readouterr().err)
