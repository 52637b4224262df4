"""Benchmark the decision scan: the numpy loop (`dla_shared.scan.scan_numpy`) vs the compiled one
(`shared/_scan.c`), and what each leaves of torch's DLA chunk forward, beside the single-state policy on the
same path. One torch thread, B = 1, H = 4, Dk = Dv = 64, K = 30; medians of ``--repeats``, all in one run.

    python scripts/bench_scan.py --out bench/scan_cpu     # writes OUT.json, prints a markdown table
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from dla_shared import DLAConfig, scan
from dla_torch import dla_attention
from dla_torch.ops.attention import empty_state
from dla_torch.ops.chunk import CHUNK


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--capacity", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--delta", action="store_true", help="gated delta rule instead of the diagonal transition")
    p.add_argument("--out", default="bench/scan_cpu", help="writes OUT.json")
    args = p.parse_args(argv)
    if scan._scan is None:
        p.error("the compiled scan is not built (no C compiler at install): nothing to compare")
    torch.set_num_threads(1)
    H, D = 4, 64
    rows = []
    for T in args.lengths:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, T, H, D, generator=gen) for _ in range(3))
        k = torch.nn.functional.normalize(k, dim=-1)
        g = -0.1 * torch.rand(1, T, H, generator=gen)
        beta = torch.rand(1, T, H, generator=gen) if args.delta else None
        dla = DLAConfig(policy="dla", capacity=args.capacity)
        single = DLAConfig(policy="single")
        lam = torch.rand(1, T, H, dla.num_slots, generator=gen)
        state = empty_state(1, H, dla.num_slots, D, D, torch.float32, "cpu")
        host = [x.numpy() if x is not None else None for x in (k, v, g, beta)]
        scan_args = (dla, *host, torch.ones(1, T, dtype=torch.bool).numpy(), state.S[:, :, 0].numpy(),
                     state.n.numpy(), state.ibar.numpy(), state.pos.numpy(), state.opened.numpy(), CHUNK)
        row = {"T": T,
               "scan_numpy_s": median_time(lambda: scan.scan_numpy(*scan_args), args.repeats),
               "scan_compiled_s": median_time(lambda: scan._compiled(*scan_args), args.repeats)}
        with torch.no_grad():
            row["dla_forward_s"] = median_time(lambda: dla_attention(q, k, v, g, lam, beta, config=dla, impl="chunk"),
                                               args.repeats)
            row["single_forward_s"] = median_time(
                lambda: dla_attention(q, k, v, g, None, beta, config=single, impl="chunk"), args.repeats)
        rows.append(row)
        print(row, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "machine": platform.platform(),
                                                    "torch": torch.__version__, "rows": rows}, indent=1))
    print("| T | numpy scan (s) | compiled scan (s) | scan speed-up | DLA chunk fwd (s) | single chunk fwd (s) | "
          "DLA / single | compiled scan share of DLA fwd |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['T']} | {r['scan_numpy_s']:.3f} | {r['scan_compiled_s']:.3f} | "
              f"{r['scan_numpy_s'] / r['scan_compiled_s']:.1f}x | {r['dla_forward_s']:.3f} | "
              f"{r['single_forward_s']:.3f} | {r['dla_forward_s'] / r['single_forward_s']:.1f}x | "
              f"{r['scan_compiled_s'] / r['dla_forward_s']:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
