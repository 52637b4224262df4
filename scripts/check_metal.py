"""Check every Metal kernel against its ops path on this Mac, and time both.

    python scripts/check_metal.py                 # on Apple silicon: the real kernels at model sizes
    python scripts/check_metal.py --emulate       # anywhere: the same checks through the CPU emulation
                                                  # harness of tests/metal_emu, at small sizes

For each policy and transition: ``dla_scan`` against `dla_shared.scan` (decisions and open counts must be
equal) and ``dla_decode`` against the MLX reference for one token (relative RMS error of outputs and states,
bookkeeping equal). ``dla`` runs with a threshold per head, from 0.1 in the first head to 1 in the last. Prints
a table and exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from dla_mlx import dla_attention
from dla_mlx.ops import metal
from dla_mlx.ops.attention import empty_state
from dla_shared import DLAConfig
from dla_shared.scan import scan as shared_scan


def configs(H):
    """Each policy's config at H heads."""
    return {"single": DLAConfig(policy="single"), "fenwick": DLAConfig(policy="fenwick", capacity=16),
            "fixed": DLAConfig(policy="fixed", block_size=64),
            "dla": DLAConfig(policy="dla", threshold=tuple(np.geomspace(0.1, 1.0, H).tolist()))}


def rel_rms(ref, x):
    ref, x = np.asarray(ref, np.float64), np.asarray(x, np.float64)
    return float(np.sqrt(np.mean((ref - x) ** 2)) / (np.sqrt(np.mean(ref**2)) + 1e-12))


def timed(fn, repeat):
    out = fn()
    mx.eval(out)
    start = time.perf_counter()
    for _ in range(repeat):
        mx.eval(fn())
    return out, (time.perf_counter() - start) / repeat * 1e3


def inputs(B, T, H, Dk, Dv, L, delta, seed=0):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, T, H, Dk)).astype(np.float32)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    x = {"q": rng.standard_normal((B, T, H, Dk)), "k": k, "v": rng.standard_normal((B, T, H, Dv)),
         "g": -0.1 * rng.random((B, T, H)), "lam": rng.random((B, T, H, L)) + 0.5,
         "beta": rng.random((B, T, H)) if delta else None}
    return {n: None if a is None else mx.array(a.astype(np.float32)) for n, a in x.items()}


def check(config, delta, sizes, launch, repeat):
    B, T, H, Dk, Dv = sizes
    L = config.num_slots
    x = inputs(B, T + 1, H, Dk, Dv, L, delta)
    args = lambda s, e: [None if x[n] is None else x[n][:, s:e] for n in ("q", "k", "v", "g", "lam", "beta")]
    _, state = dla_attention(*args(0, T), config=config, output_final_state=True, impl="chunk")
    rows = []
    # The prefill scan over T tokens from an empty cache.
    active = np.ones((B, T), bool)
    host = lambda a: None if a is None else np.array(a)
    ops = lambda: shared_scan(config, host(x["k"][:, :T]), host(x["v"][:, :T]), host(x["g"][:, :T]),
                              host(x["beta"][:, :T] if delta else None), active, np.zeros((B, H, Dk, Dv), np.float32),
                              np.zeros((B, H, L), np.int64), np.zeros((B, H, L), np.float32), np.zeros(B, np.int64),
                              np.zeros((B, H), np.int64), 64)
    start = time.perf_counter()
    sigma, (n, _, _, opened) = ops()
    ops_ms = (time.perf_counter() - start) * 1e3
    empty = empty_state(B, H, L, Dk, Dv)
    spec = metal.scan_launch(config, x["k"][:, :T], x["v"][:, :T], x["g"][:, :T], x["beta"][:, :T] if delta else None,
                             mx.array(active), empty.S[:, :, 0], empty.n, empty.ibar, empty.pos, empty.opened, 64)
    (sigma2, n2, _, opened2), kernel_ms = timed(lambda: launch(spec), repeat)
    ok = all(np.array_equal(np.array(a), b) for a, b in ((sigma2, sigma), (n2, n), (opened2, opened)))
    rows.append(("dla_scan", f"T={T}", "equal" if ok else "DIFFERENT", ok, ops_ms, kernel_ms))
    # One decode step after the prefill.
    step = args(T, T + 1)
    (o, final), ops_ms = timed(lambda: dla_attention(*step, config=config, initial_state=state, output_final_state=True,
                                                     impl="reference"), repeat)
    first = [None if a is None else a[:, 0] for a in step]
    spec = metal.decode_launch(config, *first[:5], first[5], mx.ones((B,), dtype=mx.bool_), state, 1.0)
    (o2, S2, n2, _, opened2), kernel_ms = timed(lambda: launch(spec), repeat)
    err = max(rel_rms(o[:, 0], o2), rel_rms(final.S, S2))
    ok = err < 1e-5 and np.array_equal(np.array(n2), np.array(final.n)) and \
        np.array_equal(np.array(opened2), np.array(final.opened))
    rows.append(("dla_decode", f"pos={T}", f"{err:.1e}", ok, ops_ms, kernel_ms))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--emulate", action="store_true", help="run the kernels through the CPU emulation harness")
    p.add_argument("--repeat", type=int, default=None, help="timed repetitions (default 20, 1 when emulating)")
    args = p.parse_args(argv)
    if args.emulate:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from metal_emu.harness import emulate as launch

        sizes, repeat = (2, 70, 2, 9, 40), args.repeat or 1
    elif not mx.metal.is_available():
        print("No Metal device here: run this on Apple silicon, or pass --emulate for the CPU harness.",
              file=sys.stderr)
        return 2
    else:
        launch, sizes, repeat = metal.run, (1, 2048, 8, 128, 128), args.repeat or 20
    print(f"{'kernel':<11} {'policy':<8} {'transition':<10} {'where':<9} {'vs ops':>10} {'ops ms':>9} "
          f"{'kernel ms':>10}")
    failed = 0
    for policy, config in configs(sizes[2]).items():
        for delta in (False, True):
            for name, where, result, ok, ops_ms, kernel_ms in check(config, delta, sizes, launch, repeat):
                failed += not ok
                print(f"{name:<11} {policy:<8} {'delta' if delta else 'diagonal':<10} {where:<9} {result:>10} "
                      f"{ops_ms:9.2f} {kernel_ms:10.2f}")
    print("all kernels agree with their ops paths" if not failed else f"{failed} checks FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
