"""The recall tasks (MQAR, needle) produce what they claim, and the small-scale experiment runs end to end."""

import json

import numpy as np
import pytest

from dla_shared import recall

from helpers import SCRIPTS, load_script


@pytest.mark.parametrize("pairs", [1, 4, 16], ids=lambda p: f"pairs{p}")
@pytest.mark.parametrize("seq_len", [64, 100], ids=lambda t: f"T{t}")
def test_mqar_answers_are_recoverable(seq_len, pairs):
    b = recall.mqar(20, seq_len, pairs, seed=3)
    assert b.inputs.shape == b.targets.shape == (20, seq_len)
    np.testing.assert_array_equal(recall.answers(b.inputs), b.targets)
    assert ((b.targets != recall.IGNORE).sum(-1) == pairs).all()  # every key is asked once
    keys = b.inputs[:, : 2 * pairs : 2]
    assert all(len(set(row)) == pairs for row in keys.tolist())  # distinct keys
    assert ((keys >= 2) & (keys < 2 + 64)).all() and (b.inputs[:, 1 : 2 * pairs : 2] >= 2 + 64).all()


@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_needle_answer_is_recoverable_and_placed_at_depth(depth):
    b = recall.needle(20, 81, depth, seed=4)
    np.testing.assert_array_equal(recall.answers(b.inputs), b.targets)
    for row, target in zip(b.inputs, b.targets):
        (t,) = np.nonzero(target != recall.IGNORE)[0]
        assert row[t - 1] == recall.QUERY
        (where,) = np.nonzero(row[: t - 1] == row[t])[0]  # the needle key occurs once in the haystack
        assert row[where + 1] == target[t]
        assert where == 2 * round(depth * ((81 - 3) // 2 - 1))


def test_accuracy_counts_scored_positions_only():
    targets = np.array([[recall.IGNORE, 3, recall.IGNORE, 1]])
    logits = np.zeros((1, 4, 5))
    logits[0, 1, 3] = logits[0, 3, 2] = 1  # right at t=1, wrong at t=3
    assert recall.accuracy(logits, targets) == 0.5


def test_bad_task_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="seq_len"):
        recall.mqar(1, 10, 4)
    with pytest.raises(ValueError, match="num_keys"):
        recall.mqar(1, 64, 8, num_keys=4)
    with pytest.raises(ValueError, match="depth"):
        recall.needle(1, 64, 1.5)


def test_recall_experiment_runs_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))  # --jobs 2: the worker processes import the script
    experiment = load_script("recall_experiment")
    out = tmp_path / "recall"
    assert experiment.main(["--steps", "2", "--lengths", "16", "--pairs", "2", "--depths", "0.5", "--states", "5",
                            "--hidden", "16", "--head-dim", "8", "--layers", "1", "--batch", "4", "--eval-n", "4",
                            "--jobs", "2", "--seeds", "0", "1", "--out", str(out)]) == 0
    written = json.loads(out.with_suffix(".json").read_text())
    results = written["results"]
    runs = {(r["transition"], r["policy"], r["seed"]) for r in results}
    assert runs == {(t, p, s) for t in ("diagonal", "delta") for p in experiment.POLICIES for s in (0, 1)}
    assert all(0 <= r["accuracy"] <= 1 for r in results)
    rates = {(r["policy"], r["seed"]): r["boundary_rate"] for r in written["runs"] if r["transition"] == "delta"}
    assert rates["single", 0] == 0 and rates["fenwick", 0] == 1  # one state; a new level-0 state every token
    moved = {r["policy"]: bool((np.array(r["tau"]) != np.float32(0.6)).any()) for r in written["runs"]}
    assert not moved["dla-paper"] and moved["dla-1/4"]  # fixed thresholds vs the target-rate controller
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "**MQAR** accuracy" in out.with_suffix(".md").read_text() and "NEEDLE" in capsys.readouterr().out
    # --merge joins runs made separately (one seed each) into the same tables
    for seed in (0, 1):
        part = {"args": written["args"], "runs": [r for r in written["runs"] if r["seed"] == seed],
                "results": [r for r in results if r["seed"] == seed]}
        (tmp_path / f"seed{seed}.json").write_text(json.dumps(part))
    merged = tmp_path / "merged"
    seeds = [str(tmp_path / f"seed{s}.json") for s in (0, 1)]
    assert experiment.main(["--merge", *seeds, "--out", str(merged)]) == 0
    assert merged.with_suffix(".md").read_text() == out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):
        experiment.main(["--merge", seeds[0], seeds[0], "--out", str(merged)])
