"""Prefill benchmark (MLX): DLA's chunk path against mlx-lm's single-state gated delta op, in one run.

Times `dla_mlx.dla_attention` (impl="chunk", the delta rule) and, inside it, the decision scan (on the host),
against `mlx_lm.models.gated_delta.gated_delta_ops` (the ops path mlx-lm runs off Metal) on the same inputs,
B = 1, H = 4, Dk = Dv = 64, K = 30 by default. Writes OUT.json and prints a markdown table.

    python scripts/bench_prefill.py --lengths 512 2048 --out bench/prefill_cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.gated_delta import gated_delta_ops

import dla_mlx
from dla_mlx.ops.attention import empty_state
from dla_mlx.ops.chunk import CHUNK, host_scan
from dla_shared import DLAConfig


def best_time(fn, repeats):
    """Best wall time of ``repeats`` evaluated runs after one warm-up run."""
    mx.eval(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64, help="Dk = Dv")
    p.add_argument("--capacity", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/prefill_cpu", help="writes OUT.json")
    args = p.parse_args(argv)
    mx.random.seed(0)
    H, D, L = args.heads, args.dim, args.capacity
    config = DLAConfig(policy="dla", capacity=L)
    rows = []
    for T in args.lengths:
        q, k, v = (mx.random.normal((1, T, H, D)) for _ in range(3))
        k = k / mx.linalg.norm(k, axis=-1, keepdims=True)
        g, beta = -0.1 * mx.random.uniform(shape=(1, T, H)), mx.random.uniform(shape=(1, T, H))
        lam = mx.random.uniform(shape=(1, T, H, L))
        state, active = empty_state(1, H, L, D, D), np.ones((1, T), bool)
        dla = best_time(lambda: dla_mlx.dla_attention(q, k, v, g, lam, beta, config=config, impl="chunk")[0],
                        args.repeats)
        scan = best_time(lambda: host_scan(config, k, v, g, beta, active, state, CHUNK)[0], args.repeats)
        base = best_time(lambda: gated_delta_ops(q, k, v, mx.exp(g), beta)[0], args.repeats)
        rows.append({"T": T, "dla_chunk_s": dla, "dla_scan_s": scan, "gated_delta_ops_s": base})
        print(rows[-1], flush=True)
    meta = {"device": str(mx.default_device()), "machine": platform.machine(), "mlx": mx.__version__} | vars(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("| T | DLA chunk (s) | its scan (s) | mlx-lm gated delta ops (s) | DLA / gated delta |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['T']} | {r['dla_chunk_s']:.3f} | {r['dla_scan_s']:.3f} | {r['gated_delta_ops_s']:.3f} | "
              f"{r['dla_chunk_s'] / r['gated_delta_ops_s']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
