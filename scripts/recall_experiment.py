"""The paper's claim at small scale: does DLA's adaptive state cache help recall?

Trains one tiny language model per (transition, policy, seed) on a mix of MQAR and needle-in-a-haystack
sequences (`dla_shared.recall`), every policy holding the same number of states, then scores each on fresh
sequences: MQAR accuracy by sequence length and number of key-value pairs, needle accuracy by length and depth.
Beside the accuracy it reports each policy's boundary rate (the share of tokens that opened a state, over the
last tenth of training). Writes ``OUT.json`` (every number), ``OUT.md`` (the tables) and ``OUT.png`` (the curves).

    python scripts/recall_experiment.py --transitions delta --seeds 0 1 2 --jobs 2 --out bench/recall_rates
    python scripts/recall_experiment.py --steps 5 --lengths 32 --pairs 2  # a smoke test
    python scripts/recall_experiment.py --merge bench/recall_s0.json bench/recall_s1.json --out bench/recall

``--merge`` joins the results of earlier runs (say one seed per run) into one set of tables and plot.

Models: ``dla_mamba2`` (diagonal transition) and ``dla_gated_deltanet`` (gated delta rule). Policies at a
matched number of states K (``--states``): ``single`` (one state: the base model), ``fixed`` (a state every
ceil(max length / K) tokens), ``fenwick`` (K Fenwick levels, Log-Linear Attention), ``dla-paper`` (the paper's
reading: token_drift at the absolute threshold 0.6) and ``dla-1/4``, ``dla-1/8`` (state_drift, every head's
threshold following target rate 1/4 or 1/8 in training, DESIGN section 2).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dla_shared import DLAConfig, recall
from dla_shared.plot import pyplot
from dla_torch.models.base import dla_mixers
from dla_torch.models.dla_gated_deltanet import DLAGatedDeltaNetConfig, DLAGatedDeltaNetForCausalLM
from dla_torch.models.dla_mamba2 import DLAMamba2Config, DLAMamba2ForCausalLM
from dla_torch.thresholds import follow_target_rate, step_counts

POLICIES = ("single", "fixed", "fenwick", "dla-paper", "dla-1/4", "dla-1/8")
TARGET_RATES = {"dla-1/4": 0.25, "dla-1/8": 0.125}
TRANSITIONS = {"diagonal": "dla_mamba2", "delta": "dla_gated_deltanet"}


def policy_config(policy: str, states: int, max_len: int) -> DLAConfig:
    if policy == "single":
        return DLAConfig(policy="single")
    if policy == "fenwick":
        if 2 ** (states - 1) < max_len:
            raise ValueError(f"--states {states}: {states} Fenwick levels hold {2 ** (states - 1)} tokens, "
                             f"fewer than the longest sequence ({max_len})")
        return DLAConfig(policy="fenwick", capacity=states)
    if policy == "fixed":
        return DLAConfig(policy="fixed", capacity=states, block_size=math.ceil(max_len / states))
    if policy == "dla-paper":
        return DLAConfig(policy="dla", capacity=states, score="token_drift", threshold=0.6, target_rate=None)
    return DLAConfig(policy="dla", capacity=states, score="state_drift", target_rate=TARGET_RATES[policy])


def build_model(transition: str, dla: DLAConfig, args):
    common = {"vocab_size": args.vocab, "hidden_size": args.hidden, "num_hidden_layers": args.layers, "dla": dla}
    if transition == "diagonal":
        config = DLAMamba2Config(**common, num_heads=2 * args.hidden // args.head_dim, head_dim=args.head_dim,
                                 state_size=args.head_dim)
        model = DLAMamba2ForCausalLM(config)
    else:
        config = DLAGatedDeltaNetConfig(**common, num_heads=args.hidden // args.head_dim, head_dim=args.head_dim,
                                        expand_v=1.0)
        model = DLAGatedDeltaNetForCausalLM(config)
    if args.init_std is not None:
        model.init_weights(args.init_std)
    return model


def batch(rng, args, size):
    """A training batch: MQAR or needle, at a random length (and pairs or depth)."""
    length = int(rng.choice(args.lengths))
    seed = int(rng.integers(2**31))
    if rng.random() < 0.5:
        pairs = int(rng.choice([p for p in args.pairs if 4 * p <= length]))
        return recall.mqar(size, length, pairs, args.vocab, args.keys, seed)
    return recall.needle(size, length, float(rng.random()), args.vocab, args.keys, seed)


def train(model, args, seed):
    """Returns the losses and each step's boundary rate (mean over layers and heads); thresholds follow the
    config's target rate after every step, as dla-train does."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)  # linear warmup, then cosine to zero
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(
        math.pi * min(s / args.steps, 1)))))
    model.train()
    mixers = dla_mixers(model)
    losses, rates = [], []
    for _ in range(args.steps):
        b = batch(rng, args, args.batch)
        logits = model(torch.from_numpy(b.inputs)).logits
        loss = F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(b.targets).flatten(), ignore_index=recall.IGNORE)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        target = model.config.dla.target_rate if model.config.dla.policy == "dla" else None
        rate = follow_target_rate(mixers, step_counts(mixers), target, args.eta)
        rates.append(float(rate.mean()))
    return losses, rates


@torch.no_grad()
def evaluate(model, args):
    """Rows {task, length, pairs or depth, accuracy} on sequences the model has not seen (seed offset)."""
    model.eval()
    rows = []
    score = lambda b: recall.accuracy(model(torch.from_numpy(b.inputs)).logits.numpy(), b.targets)
    for length in args.lengths:
        for pairs in args.pairs:
            if 4 * pairs <= length:
                b = recall.mqar(args.eval_n, length, pairs, args.vocab, args.keys, seed=10**6 + length * 100 + pairs)
                rows.append({"task": "mqar", "length": length, "pairs": pairs, "accuracy": score(b)})
        for depth in args.depths:
            b = recall.needle(args.eval_n, length, depth, args.vocab, args.keys, seed=2 * 10**6 + length)
            rows.append({"task": "needle", "length": length, "depth": depth, "accuracy": score(b)})
    return rows


def run_one(transition, policy, seed, args):
    """Train and score one model; returns (result rows, run summary)."""
    torch.set_num_threads(1)
    dla = policy_config(policy, args.states, max(args.lengths))
    torch.manual_seed(seed)
    model = build_model(transition, dla, args)
    start = time.perf_counter()
    losses, rates = train(model, args, seed)
    key = {"transition": transition, "policy": policy, "seed": seed}
    rows = [{**key, **r} for r in evaluate(model, args)]
    tail = max(1, args.steps // 10)
    run = {**key, "dla": dla.to_dict(), "seconds": time.perf_counter() - start,
           "final_loss": float(np.mean(losses[-20:])), "boundary_rate": float(np.mean(rates[-tail:])),
           "tau": [mixer.tau.tolist() for mixer in dla_mixers(model)]}
    print(f"{TRANSITIONS[transition]:<19} {policy:<9} seed {seed}  loss {run['final_loss']:.3f}  boundary rate "
          f"{run['boundary_rate']:.3f}  mean accuracy {np.mean([r['accuracy'] for r in rows]):.3f}  "
          f"({run['seconds']:.0f} s)", flush=True)
    return rows, run


def summary(results, runs) -> str:
    """Per (transition, policy): boundary rate and mean MQAR / needle accuracy, mean over seeds (range)."""
    lines = ["| model | policy | boundary rate | MQAR | needle | seeds |", "|---|---|---:|---:|---:|---:|"]
    cell = lambda xs: f"{np.mean(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"
    for transition, policy in sorted({(r["transition"], r["policy"]) for r in runs},
                                     key=lambda x: (x[0], POLICIES.index(x[1]))):
        mine = [r for r in runs if (r["transition"], r["policy"]) == (transition, policy)]
        acc = {task: [np.mean([x["accuracy"] for x in results if x["task"] == task and (x["transition"], x["policy"],
                               x["seed"]) == (transition, policy, r["seed"])]) for r in mine]
               for task in ("mqar", "needle")}
        rate = [r["boundary_rate"] for r in mine]
        lines.append(f"| {TRANSITIONS[transition]} | {policy} | {np.mean(rate):.3f} | {cell(acc['mqar'])} | "
                     f"{cell(acc['needle'])} | {len(mine)} |")
    return "\n".join(lines) + "\n"


def tables(results) -> str:
    """Accuracy by length and pairs (MQAR) or depth (needle), mean over seeds."""
    lines = []
    for task, key in (("mqar", "pairs"), ("needle", "depth")):
        cells = sorted({(r["length"], r[key]) for r in results if r["task"] == task})
        runs = sorted({(r["transition"], r["policy"]) for r in results}, key=lambda x: (x[0], POLICIES.index(x[1])))
        head = [f"T={t}, {key}={v}" for t, v in cells]
        lines += [f"**{task.upper()}** accuracy", "", "| model | policy | " + " | ".join(head) + " | mean |",
                  "|---|---|" + "---:|" * (len(head) + 1)]
        for transition, policy in runs:
            mine = [r for r in results if (r["task"], r["transition"], r["policy"]) == (task, transition, policy)]
            values = [np.mean([r["accuracy"] for r in mine if (r["length"], r[key]) == c]) for c in cells]
            lines.append(f"| {TRANSITIONS[transition]} | {policy} | " + " | ".join(f"{a:.2f}" for a in values)
                         + f" | **{np.mean(values):.2f}** |")
        lines.append("")
    return "\n".join(lines)


def plot(results, path):
    plt = pyplot()
    transitions = sorted({r["transition"] for r in results})
    fig, axes = plt.subplots(len(transitions), 2, figsize=(10, 3.5 * len(transitions)), squeeze=False)
    for row, transition in enumerate(transitions):
        for col, task in enumerate(("mqar", "needle")):
            ax = axes[row, col]
            for policy in POLICIES:
                mine = [r for r in results if (r["transition"], r["task"], r["policy"]) == (transition, task, policy)]
                if not mine:
                    continue
                lengths = sorted({r["length"] for r in mine})
                ax.plot(lengths, [np.mean([r["accuracy"] for r in mine if r["length"] == t]) for t in lengths],
                        marker="o", label=policy)
            ax.set_title(f"{TRANSITIONS[transition]}: {task.upper()} (mean over "
                         f"{'pairs' if task == 'mqar' else 'depths'})")
            ax.set_xlabel("sequence length")
            ax.set_ylabel("accuracy")
            ax.set_ylim(-0.02, 1.02)
            ax.set_xscale("log", base=2)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/recall", help="writes OUT.json, OUT.md and OUT.png")
    p.add_argument("--transitions", nargs="+", default=list(TRANSITIONS), choices=list(TRANSITIONS))
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--states", type=int, default=7, help="states of every multi-state policy")
    p.add_argument("--eta", type=float, default=0.1, help="the threshold controller's step size (dla-1/4, dla-1/8)")
    p.add_argument("--lengths", type=int, nargs="+", default=[32, 64])
    p.add_argument("--pairs", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--vocab", type=int, default=48)
    p.add_argument("--keys", type=int, default=16, help="key tokens (the rest after two specials are values)")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--init-std", type=float, default=None,
                   help="std of the Linear and Embedding weights at init (default: the models' own, 0.02)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-n", type=int, default=64, help="sequences per evaluation cell")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--jobs", type=int, default=1, help="models trained at once (one CPU thread each)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="join these runs' OUT.json files instead of training")
    args = p.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        runs = [run for part in parts for run in part["runs"]]
        keys = [(r["transition"], r["policy"], r["seed"]) for r in runs]
        if len(set(keys)) != len(keys):
            p.error("--merge: the files repeat a (transition, policy, seed) run")
        write(Path(args.out), {"merged": args.merge, "args": [part["args"] for part in parts]}, runs,
              [row for part in parts for row in part["results"]])
        return 0
    if not any(4 * pairs <= min(args.lengths) for pairs in args.pairs):
        p.error("--pairs: the shortest length must hold at least one of them (4 tokens per pair)")
    jobs = [(transition, policy, seed, args) for seed in args.seeds for transition in args.transitions
            for policy in args.policies]
    for policy in args.policies:  # refuse bad settings before any training
        policy_config(policy, args.states, max(args.lengths))
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            done = pool.starmap(run_one, jobs)
    else:
        done = [run_one(*job) for job in jobs]
    write(Path(args.out), {"args": vars(args)}, [run for _, run in done], [row for rows, _ in done for row in rows])
    return 0


def write(out: Path, header: dict, runs: list, results: list):
    """OUT.json (every number), OUT.md (the tables) and OUT.png (the curves)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**header, "runs": runs, "results": results}, indent=1))
    table = summary(results, runs) + "\n" + tables(results)
    out.with_suffix(".md").write_text(table)
    plot(results, out.with_suffix(".png"))
    print(table)


if __name__ == "__main__":
    raise SystemExit(main())
