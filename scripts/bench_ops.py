"""Benchmark dla_torch.dla_attention: forward and forward+backward time per impl vs sequence length.

Compares each impl of the `dla` policy with two single-state bases: `policy="single"` through the same
chunk path (which runs the decision scan too), and fla's pure-torch chunk of the base model with no scan
(`naive_chunk_simple_gla`, or `naive_chunk_gated_delta_rule` with --delta), at B=1, H=4, Dk=Dv=64, K=30 by
default. Writes a JSON of every timing and a log-log plot, and prints a markdown table with the ratios
measured in the same run.

    python scripts/bench_ops.py                       # T = 512 .. 16384; reference up to T = 2048
    python scripts/bench_ops.py --lengths 512 8192 --threads 1 --delta --out bench/ops_cpu_delta
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dla_shared import DLAConfig
from dla_shared.plot import pyplot
from dla_torch import dla_attention
from dla_torch.ops.fla_naive import load


def inputs(T, B, H, D, L, delta, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)
    x = {
        "q": rand(B, T, H, D),
        "k": torch.nn.functional.normalize(rand(B, T, H, D), dim=-1),
        "v": rand(B, T, H, D),
        "g": -0.1 * torch.rand(B, T, H, generator=gen),
        "lam": torch.rand(B, T, H, L, generator=gen),
        "beta": torch.rand(B, T, H, generator=gen) if delta else None,
    }
    return x


def timed(fn, repeats):
    """Best wall time of ``repeats`` runs after one warm-up run."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def fla_naive(delta: bool):
    """fla's pure-torch chunk of the single-state base (`dla_torch.ops.fla_naive`), as a function of our
    inputs."""
    folder, name = ("gated_delta_rule", "naive_chunk_gated_delta_rule") if delta else ("simple_gla",
                                                                                     "naive_chunk_simple_gla")
    fn = getattr(load(folder), name)
    if delta:
        return lambda q, k, v, g, lam, beta: fn(q, k, v, g, beta)[0]
    return lambda q, k, v, g, lam, beta: fn(q, k, v, g)[0]


def measure(impl, config, x, repeats):
    """Best forward and forward+backward seconds; ``impl`` is a dla_attention impl or a function."""
    run = impl if callable(impl) else lambda *t: dla_attention(*t, config=config, impl=impl)[0]

    def forward():
        with torch.no_grad():
            run(*x.values())

    def forward_backward():
        leaves = {n: None if t is None else t.clone().requires_grad_() for n, t in x.items()}
        run(*leaves.values()).sum().backward()

    return timed(forward, repeats), timed(forward_backward, repeats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--reference-max-length", type=int, default=2048, help="the token loop is slow beyond")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64, help="Dk = Dv")
    p.add_argument("--capacity", type=int, default=30)
    p.add_argument("--delta", action="store_true", help="gated delta rule instead of the diagonal transition")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="bench/ops_cpu", help="writes OUT.json and OUT.png")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    naive = fla_naive(args.delta)
    # The token loop last at each length: its large autograd graph must not slow the runs after it.
    runs = [("dla", "chunk"), ("single", "chunk"), ("single", "fla-naive"), ("dla", "reference")]
    rows = []
    todo = [(T, policy, impl) for T in args.lengths for policy, impl in runs
            if impl != "reference" or T <= args.reference_max_length]
    for T, policy, impl in tqdm(todo, desc="bench", unit="run"):
        config = DLAConfig(policy=policy, capacity=args.capacity)
        x = inputs(T, 1, args.heads, args.dim, config.num_slots, args.delta)
        fwd, fwd_bwd = measure(naive if impl == "fla-naive" else impl, config, x, args.repeats)
        rows.append({"T": T, "policy": policy, "impl": impl, "fwd_s": fwd, "fwd_bwd_s": fwd_bwd})
    meta = {"device": "cpu", "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "B": 1, "H": args.heads, "D": args.dim, "K": args.capacity,
            "transition": "delta" if args.delta else "diagonal", "repeats": args.repeats}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot(rows, meta, out.with_suffix(".png"))
    print(table(rows))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


def table(rows) -> str:
    """Markdown: seconds per impl, chunk's speed-up over reference where both ran, and DLA's cost over each
    single-state base (forward; forward+backward)."""
    by = {(r["T"], r["policy"], r["impl"]): r for r in rows}
    lines = ["| T | dla reference fwd+bwd (s) | dla chunk fwd / fwd+bwd (s) | single chunk fwd / fwd+bwd (s) "
             "| fla naive fwd / fwd+bwd (s) | chunk vs reference (fwd+bwd) | dla / single | dla / fla naive |",
             "|---|---|---|---|---|---|---|---|"]
    pair = lambda r: f"{r['fwd_s']:.2f} / {r['fwd_bwd_s']:.2f}"
    ratio = lambda a, b: f"{a['fwd_s'] / b['fwd_s']:.1f} / {a['fwd_bwd_s'] / b['fwd_bwd_s']:.1f}"
    for T in sorted({r["T"] for r in rows}):
        ref, chunk = by.get((T, "dla", "reference")), by[(T, "dla", "chunk")]
        single, naive = by[(T, "single", "chunk")], by[(T, "single", "fla-naive")]
        ref_s = f"{ref['fwd_bwd_s']:.2f}" if ref else "-"
        speedup = f"{ref['fwd_bwd_s'] / chunk['fwd_bwd_s']:.1f}x" if ref else "-"
        lines.append(f"| {T} | {ref_s} | {pair(chunk)} | {pair(single)} | {pair(naive)} | {speedup} | "
                     f"{ratio(chunk, single)} | {ratio(chunk, naive)} |")
    return "\n".join(lines)


def plot(rows, meta, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (policy, impl), style in {("dla", "reference"): "o-", ("dla", "chunk"): "s-", ("single", "chunk"): "^--",
                                  ("single", "fla-naive"): "v:"}.items():
        sel = [r for r in rows if r["policy"] == policy and r["impl"] == impl]
        if sel:
            ax.plot([r["T"] for r in sel], [r["fwd_bwd_s"] for r in sel], style, label=f"{policy} / {impl}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("forward + backward (s)")
    ax.set_title(f"dla_attention on {meta['device']} ({meta['threads']} threads), H={meta['H']}, "
                 f"D={meta['D']}, K={meta['K']}, {meta['transition']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
