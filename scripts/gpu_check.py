"""One command for a CUDA machine: check impl="triton" against the reference, then time it against fla.

1. Correctness: `triton` vs `reference` (fp32, T = --check-length) and vs `chunk` (fp32 and bf16 inputs,
   T = --length) for every policy and both transitions, with per-head thresholds: relative RMS error of
   outputs, final states and gradients (DESIGN section 5: outputs 4e-3, gradients 1e-2), and of the outputs
   and states of the fused forward kernel (the no-gradient path); the boundary counts (`DLAState.opened`)
   must be equal. And the decode step (impl="step") after a Triton prefill, against the reference.
2. Speed at T = --length, bf16 inputs: forward and forward+backward of `triton` (policies fenwick and dla)
   and of fla's `chunk_log_linear_attn` and `chunk_gated_delta_rule` when fla is installed, as tokens/s.

Writes OUT.json and prints a markdown table.  python scripts/gpu_check.py --out bench/gpu_h200
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from dla_shared import DLAConfig
from dla_torch import dla_attention

TOL = {"o": 4e-3, "grad": 1e-2}


def make(T, B, H, D, L, delta, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen)
    x = {"q": rnd(B, T, H, D), "k": torch.nn.functional.normalize(rnd(B, T, H, D), dim=-1), "v": rnd(B, T, H, D),
         "g": -0.05 * torch.rand(B, T, H, generator=gen), "lam": torch.rand(B, T, H, L, generator=gen),
         "beta": torch.rand(B, T, H, generator=gen) if delta else None}
    return {n: None if t is None else t.to(device, dtype if n != "g" else torch.float32) for n, t in x.items()}


def run(impl, config, x):
    leaves = {n: None if t is None else t.detach().clone().requires_grad_() for n, t in x.items()}
    o, state = dla_attention(*leaves.values(), config=config, impl=impl, output_final_state=True)
    gen = torch.Generator(device="cpu").manual_seed(1)
    w = torch.randn(o.shape, generator=gen).to(o)
    (o.float() * w.float()).sum().backward()
    grads = {n: t.grad for n, t in leaves.items() if t is not None}
    return o, state, grads


def rel(ref, x):
    ref, x = ref.detach().double(), x.detach().double()
    return float((ref - x).pow(2).mean().sqrt() / (ref.pow(2).mean().sqrt() + 1e-12))


def check(args, device):
    """Every policy against the token loop at --check-length; dla against chunk at --length (fp32, bf16)."""
    cases = [(policy, delta, "reference", args.check_length, torch.float32)
             for policy in ("fenwick", "fixed", "dla") for delta in (False, True)]
    cases += [("dla", delta, "chunk", args.length, dtype) for delta in (False, True)
              for dtype in (torch.float32, torch.bfloat16)]
    # One threshold per head, spread so that the heads open states at different rates in both transitions.
    thresholds = tuple(torch.linspace(0.1, 0.8, args.heads).tolist())
    rows = []
    for policy, delta, against, T, dtype in cases:
        config = DLAConfig(policy=policy, capacity=max(30, math.ceil(math.log2(T)) + 1), threshold=thresholds)
        x = make(T, 1, args.heads, args.dim, config.num_slots, delta, dtype, device)
        o, s, gr = run("triton", config, x)
        o2, s2, gr2 = run(against, config, x)
        with torch.no_grad():  # without gradients: the fused chunk forward kernel
            o3, s3 = dla_attention(*x.values(), config=config, impl="triton", output_final_state=True)
        errors = {"o": rel(o2, o), "S": rel(s2.S, s.S), "o_fused": rel(o2, o3), "S_fused": rel(s2.S, s3.S)} | \
            {f"d{n}": rel(gr2[n], gr[n]) for n in gr}
        opened_differ = int((s.opened != s2.opened).sum() + (s3.opened != s2.opened).sum())  # (row, head)s
        ok = all(errors[n] <= TOL["o"] for n in ("o", "S", "o_fused", "S_fused")) and \
            all(e <= TOL["grad"] for n, e in errors.items() if n.startswith("d")) and opened_differ == 0
        rows.append({"policy": policy, "transition": "delta" if delta else "diagonal", "against": against,
                     "T": T, "dtype": str(dtype).split(".")[-1], "errors": errors,
                     "opened": s2.opened.tolist(), "opened_differ": opened_differ, "ok": ok})
        print(("ok  " if ok else "FAIL"), rows[-1], flush=True)
    return rows + check_step(args, device, thresholds)


def check_step(args, device, thresholds, steps=32):
    """The decode step on the device (fp32): a Triton prefill of --check-length tokens, then one token per
    call with impl="step", against the reference over the same tokens: outputs, final states, boundaries."""
    rows = []
    for policy in ("fenwick", "dla"):
        for delta in (False, True):
            T = args.check_length
            config = DLAConfig(policy=policy, capacity=max(30, math.ceil(math.log2(T + steps)) + 1),
                               threshold=thresholds)
            x = make(T + steps, 1, args.heads, args.dim, config.num_slots, delta, torch.float32, device)
            part = lambda s, e: [None if t is None else t[:, s:e] for t in x.values()]
            with torch.no_grad():
                _, state = dla_attention(*part(0, T), config=config, impl="triton", output_final_state=True)
                o2, s2 = dla_attention(*part(T, T + steps), config=config, initial_state=state, impl="reference",
                                       output_final_state=True)
                outputs = []
                for t in range(T, T + steps):
                    o, state = dla_attention(*part(t, t + 1), config=config, initial_state=state, impl="step",
                                             output_final_state=True)
                    outputs.append(o)
            errors = {"o": rel(o2, torch.cat(outputs, dim=1)), "S": rel(s2.S, state.S)}
            opened_differ = int((state.opened.cpu() != s2.opened.cpu()).sum())
            ok = all(e <= TOL["o"] for e in errors.values()) and opened_differ == 0
            rows.append({"policy": policy, "transition": "delta" if delta else "diagonal", "against": "reference",
                         "impl": "step", "T": T + steps, "dtype": "float32", "errors": errors,
                         "opened": s2.opened.tolist(), "opened_differ": opened_differ, "ok": ok})
            print(("ok  " if ok else "FAIL"), rows[-1], flush=True)
    return rows


def bench(fn, x, backward):
    import triton.testing

    def step():
        leaves = {n: None if t is None else t.detach().requires_grad_(backward) for n, t in x.items()}
        o = fn(leaves)
        if backward:
            o.float().sum().backward()

    return triton.testing.do_bench(step, warmup=25, rep=100) / 1e3


def speed(args, device):
    T, H, D = args.length, args.heads, args.dim
    fns = {}
    for policy in ("fenwick", "dla"):
        for delta in (False, True):
            config = DLAConfig(policy=policy,
                               capacity=max(30, math.ceil(math.log2(T)) + 1) if policy == "fenwick" else 30)
            fns[f"dla triton {policy} {'delta' if delta else 'diagonal'}"] = (
                lambda x, c=config: dla_attention(*x.values(), config=c, impl="triton")[0], config.num_slots, delta)
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.log_linear_attn import chunk_log_linear_attn

        levels = math.ceil(math.log2(T)) + 1
        fns["fla chunk_log_linear_attn"] = (
            lambda x: chunk_log_linear_attn(x["q"], x["k"], x["v"], x["g"], x["lam"])[0], levels, False)
        fns["fla chunk_gated_delta_rule"] = (
            lambda x: chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"])[0], 1, True)
    except ImportError as error:
        print(f"fla not available ({error}); timing DLA alone", file=sys.stderr)
    rows = []
    for name, (fn, L, delta) in fns.items():
        x = make(T, args.batch, H, D, L, delta, torch.bfloat16, device)
        fwd, fwd_bwd = bench(fn, x, False), bench(fn, x, True)
        tokens = args.batch * T
        rows.append({"name": name, "T": T, "fwd_s": fwd, "fwd_bwd_s": fwd_bwd,
                     "fwd_tok_s": tokens / fwd, "fwd_bwd_tok_s": tokens / fwd_bwd})
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--check-length", type=int, default=1024, help="T of the comparison with the token loop")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--out", default="bench/gpu_check")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    device = "cuda"
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args)}
    result["check"] = [] if args.skip_check else check(args, device)
    result["speed"] = speed(args, device)
    out = Path(args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\n| impl (bf16, T={args.length}) | fwd tokens/s | fwd+bwd tokens/s |\n|---|---|---|")
    for r in result["speed"]:
        print(f"| {r['name']} | {r['fwd_tok_s']:.3g} | {r['fwd_bwd_tok_s']:.3g} |")
    print(f"wrote {out}")
    return 0 if all(r["ok"] for r in result["check"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
