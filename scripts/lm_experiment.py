"""Language modelling at equal steps and equal state budget: which cache policy gives the lowest loss?

Trains one small `dla_gated_deltanet` per policy with `dla-train` on the standard-library corpus
(`scripts/prepare_tiny.py --out data/stdlib`), same data, seed, steps and number of states, and tabulates the
validation loss and each run's boundary rate (the share of tokens that opened a state, over the last logged
steps, mean and range over layers and heads). Writes ``OUT.json`` and ``OUT.md``.

    python scripts/lm_experiment.py --jobs 2 --out bench/lm      # the README's run
    python scripts/lm_experiment.py --steps 4 --out /tmp/lm      # a smoke test

Policies: ``single`` (the base model), ``fenwick`` (Log-Linear Attention; K levels hold 2**(K-1) tokens),
``dla-paper`` (token_drift at the paper's absolute tau 0.6, thresholds fixed) and ``dla-rate`` (state_drift,
thresholds following target rate 1/8 in training).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

POLICIES = {
    "single": {"policy": "single"},
    "fenwick": {"policy": "fenwick"},
    "dla-paper": {"policy": "dla", "score": "token_drift", "threshold": 0.6, "target_rate": None},
    "dla-rate": {"policy": "dla", "score": "state_drift", "threshold": 0.6, "target_rate": 0.125},
}
BASE = {
    "model": {"type": "dla_gated_deltanet", "hidden_size": 128, "num_hidden_layers": 2, "num_heads": 2,
              "head_dim": 64, "expand_v": 1.0},
    "data": {"tokenizer": "data/stdlib/tokenizer", "train": ["data/stdlib/train.jsonl"],
             "valid": ["data/stdlib/valid.jsonl"]},
    "train": {"seq_len": 256, "micro_batch": 8, "lr": 2e-3, "warmup": 20, "log_every": 10, "eval_rows": 8,
              "dtype": "fp32", "resume": False},
}


def run_config(name: str, args) -> dict:
    """The dla-train config of one policy: K states for every multi-state policy (fenwick's K levels must
    hold a whole row)."""
    dla = dict(POLICIES[name])
    if dla["policy"] != "single":
        dla["capacity"] = args.states
    config = json.loads(json.dumps(BASE))
    config["out"] = str(Path(args.runs) / name)
    config["model"]["dla"] = dla
    config["train"].update(steps=args.steps, eval_every=args.steps, save_every=args.steps, seed=args.seed)
    return config


def train(name: str, args) -> dict:
    """Run dla-train for one policy (one CPU thread) and read its metrics."""
    config = run_config(name, args)
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(out / "train.log", "w")
    subprocess.run([sys.executable, "-m", "dla_torch.train", "--config", str(out / "config.json")], env=env,
                   stdout=log, stderr=subprocess.STDOUT, check=True)
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r for r in records if "loss" in r]
    valid = [r["valid_loss"] for r in records if "valid_loss" in r]
    row = {"policy": name, "dla": config["model"]["dla"], "steps": steps[-1]["step"],
           "valid_loss": valid[-1], "train_loss": float(np.mean([r["loss"] for r in steps[-3:]])),
           "tokens_per_s": float(np.median([r["tokens_per_s"] for r in steps]))}
    rated = [r["boundary_rate"] for r in steps[-5:] if "boundary_rate" in r]
    if rated:
        row["boundary_rate"] = {"mean": float(np.mean([np.mean(r["mean"]) for r in rated])),
                                "min": float(np.min([r["min"] for r in rated])),
                                "max": float(np.max([r["max"] for r in rated]))}
    print(f"{name:<10} valid loss {row['valid_loss']:.4f}", flush=True)
    return row


def table(rows) -> str:
    lines = ["| policy | cache | valid loss | train loss | boundary rate (mean, min-max) | tokens/s |",
             "|---|---|---:|---:|---|---:|"]
    for r in rows:
        d = r["dla"]
        cache = "one state" if d["policy"] == "single" else f"{d['policy']}, K = {d['capacity']}"
        if d["policy"] == "dla":
            cache += f", {d['score']}, " + (f"tau {d['threshold']} fixed" if d["target_rate"] is None
                                           else f"target rate {d['target_rate']:g}")
        rate = r.get("boundary_rate")
        rate = f"{rate['mean']:.3f} ({rate['min']:.3f}-{rate['max']:.3f})" if rate else "-"
        lines.append(f"| {r['policy']} | {cache} | {r['valid_loss']:.4f} | {r['train_loss']:.4f} | {rate} | "
                     f"{r['tokens_per_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/lm", help="writes OUT.json and OUT.md")
    p.add_argument("--runs", default="runs/lm", help="where each policy's dla-train run goes")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--states", type=int, default=9, help="K of every multi-state policy (fenwick: levels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="runs at once (one CPU thread each)")
    args = p.parse_args(argv)
    if "fenwick" in args.policies and 2 ** (args.states - 1) < BASE["train"]["seq_len"]:
        p.error(f"--states {args.states}: fenwick needs {math.ceil(math.log2(BASE['train']['seq_len'])) + 1} "
                f"levels for rows of {BASE['train']['seq_len']} tokens")
    if not Path(BASE["data"]["tokenizer"], "tokenizer.json").exists():
        p.error("no corpus: run `python scripts/prepare_tiny.py --out data/stdlib` first")
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda name: train(name, args), args.policies))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "base": BASE, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(table(rows) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
