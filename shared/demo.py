"""The first main job: where do `fenwick`, `fixed` and `dla` put their state boundaries?

Streams synthetic piecewise-constant key/value sequences (and a needle sequence) through the numpy
oracle at the same state budget K, prints Theorem 3.1's deviation bound B(pi) of each policy's final
partition (lower is better) and its needle recall (higher is better), and writes a PNG of the
boundaries. DLA's threshold is calibrated per stream to the stream's share of change points (the
target-rate reading of DESIGN section 2), unless ``--threshold`` gives an absolute one. Run
``dla-demo --help`` for the knobs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import numpy as np

from .calibrate import fit_thresholds
from .config import DLAConfig
from .hub import check_output_files
from .oracle import dla_attention, inspect
from .plot import FIGURE_SUFFIXES, pyplot
from .synthetic import as_batch, deviation_bound, needle_recall, needle_stream, piecewise_stream

POLICIES = ("dla", "fixed", "fenwick")


def policy_config(policy: str, budget: int, stream, g: float = 0.0, threshold: float | None = None,
                  score: str = "state_drift") -> DLAConfig:
    """The three policies at one state budget: `fixed` splits T into `budget` equal blocks (no merges);
    `fenwick` has as many levels as T needs (its number of states follows from T alone); `dla` opens
    where its score reaches ``threshold``, or (None) a threshold calibrated to the stream's rate of
    change points."""
    T = len(stream.k)
    if policy == "fixed":
        return DLAConfig(policy="fixed", capacity=budget, block_size=math.ceil(T / budget))
    if policy == "fenwick":
        return DLAConfig(policy="fenwick", capacity=max(2, math.ceil(math.log2(T)) + 1))
    config = DLAConfig(policy="dla", capacity=budget, score=score, threshold=0.6 if threshold is None else threshold)
    return config if threshold is not None else calibrated(stream, config, g)


def calibrated(stream, config: DLAConfig, g: float = 0.0) -> DLAConfig:
    """``config`` with the threshold whose open rate is the stream's share of change points."""
    x = as_batch(stream, g)
    rate = (len(stream.change_points) - 1) / (len(stream.k) - 1)
    threshold, _ = fit_thresholds(config, rate, x["k"], x["v"], x["g"])
    return dataclasses.replace(config, threshold=float(threshold[0]))


def run_policy(stream, config: DLAConfig, g: float = 0.0):
    """Final partition (spans, newest first, empty slots dropped), final states [L, Dk, Dv], trace."""
    x = as_batch(stream, g)
    trace = inspect(x["q"], x["k"], x["v"], x["g"], config=config)
    _, state = dla_attention(x["q"], x["k"], x["v"], x["g"], config=config, output_final_state=True)
    spans = [s for s in trace.spans(0, -1, 0) if s[1] > s[0]]
    return spans, state.S[0, 0], trace


def evaluate(budgets, seeds, segments, length, dim, noise, g, threshold):
    """Mean B(pi), needle recall and states used per (budget, policy) over ``seeds``."""
    rows = []
    for budget in budgets:
        for policy in POLICIES:
            bounds, recalls, states = [], [], []
            for seed in seeds:
                stream = piecewise_stream(segments, length, dim, dim, noise, seed)
                spans, _, _ = run_policy(stream, policy_config(policy, budget, stream, g, threshold), g)
                bounds.append(deviation_bound(stream.k, stream.v, spans))
                states.append(len(spans))
                needle, at = needle_stream(segments, length, dim, dim, noise, seed)
                _, S, _ = run_policy(needle, policy_config(policy, budget, needle, g, threshold), g)
                recalls.append(needle_recall(S, needle.k[at], needle.v[at]))
            rows.append({"budget": budget, "policy": policy, "states": float(np.mean(states)),
                         "B_pi": float(np.mean(bounds)), "needle_recall": float(np.mean(recalls))})
    return rows


def format_table(rows) -> str:
    lines = [f"{'budget K':>8}  {'policy':<8} {'states':>6}  {'B(pi) (lower better)':>20}  {'needle recall':>13}"]
    for r in rows:
        lines.append(f"{r['budget']:>8}  {r['policy']:<8} {r['states']:>6.1f}  {r['B_pi']:>20.3f}  "
                     f"{r['needle_recall']:>13.3f}")
    return "\n".join(lines)


def plot(path, budget, segments, length, dim, noise, g, threshold, seed=0):
    """One column per stream (piecewise, needle): the DLA score, then each policy's final states."""
    plt = pyplot()
    stream = piecewise_stream(segments, length, dim, dim, noise, seed)
    needle, at = needle_stream(segments, length, dim, dim, noise, seed)
    fig, axes = plt.subplots(1 + len(POLICIES), 2, figsize=(13, 7), sharex="col",
                             gridspec_kw={"height_ratios": [1.4] + [1] * len(POLICIES)})
    for col, (title, s) in enumerate([("piecewise-constant stream", stream), (f"needle at t={at}", needle)]):
        for policy, ax in zip(POLICIES, axes[1:, col]):
            config = policy_config(policy, budget, s, g, threshold)
            spans, _, trace = run_policy(s, config, g)
            for i, (start, end) in enumerate(sorted(spans)):
                ax.barh(0, end - start, left=start - 0.5, height=0.8, color=f"C{i % 10}", alpha=0.75,
                        edgecolor="black")
            ax.set_yticks([0], [f"{policy}\n{len(spans)} states"])
            ax.set_ylim(-0.6, 0.6)
            if policy == "dla":
                axes[0, col].plot(trace.score[0, :, 0], ".-", color="black", lw=0.8, ms=3, label="score I_t")
                axes[0, col].axhline(config.threshold, color="red", ls="--", lw=1,
                                     label=f"threshold {config.threshold:.3g}")
        for ax in axes[:, col]:
            for cp in s.change_points:
                ax.axvline(cp - 0.5, color="gray", ls=":", lw=0.8)
        axes[0, col].set_title(f"{title}, budget K={budget} (dotted: true change points)")
        axes[0, col].set_ylabel("DLA score")
        axes[0, col].legend(loc="upper right", fontsize=8)
        axes[-1, col].set_xlabel("token position")
    fig.suptitle("Final state partitions: where each policy put its state boundaries")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="dla-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", type=int, nargs="+", default=[12, 6], help="state budgets K to compare")
    p.add_argument("--segments", type=int, default=8, help="segments per stream")
    p.add_argument("--length", type=int, default=10, help="mean segment length (tokens)")
    p.add_argument("--dim", type=int, default=16, help="head dims Dk = Dv")
    p.add_argument("--noise", type=float, default=0.02, help="relative noise within a segment")
    p.add_argument("--decay", type=float, default=-0.05, help="log decay g of every token (<= 0)")
    p.add_argument("--threshold", type=float, help="an absolute DLA threshold tau (default: calibrated per "
                   "stream to its share of change points)")
    p.add_argument("--seeds", type=int, default=5, help="streams averaged per row")
    p.add_argument("--plot", default="dla_boundaries.png", help="where to write the PNG")
    p.add_argument("--json", help="also write the table as JSON here")
    args = p.parse_args(argv)
    if args.decay > 0:
        p.error(f"--decay must be <= 0, got {args.decay}")
    if min(args.budgets) < 2:
        p.error(f"--budgets must be >= 2, got {args.budgets}")
    for name in ("segments", "length", "dim", "seeds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    check_output_files(p, ("--plot", args.plot, FIGURE_SUFFIXES), ("--json", args.json, None))
    common = (args.segments, args.length, args.dim, args.noise, args.decay, args.threshold)
    rows = evaluate(args.budgets, range(args.seeds), *common)
    print(f"{args.seeds} streams of {args.segments} segments (~{args.length} tokens each), Dk = Dv = {args.dim}, "
          f"g = {args.decay}, tau = {'calibrated to the change points' if args.threshold is None else args.threshold}")
    print(format_table(rows))
    plot(args.plot, args.budgets[0], *common)
    print(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
