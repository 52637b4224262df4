"""Decode benchmark (MLX): per-token latency and bytes of cached state vs context length, for a DLA Gated
DeltaNet model, an mlx-lm Llama (KV cache) and mlx-lm's single-state gated delta model (Qwen3-Next with
every layer linear) of the same width and MLP, measured in one run.

Each row also gives the bytes a token must move at the least (every weight read once, the embedding table's
one row unless it is also the output head; the Transformer's keys and values read; the recurrent states read
and written) and the time that takes at this machine's copy bandwidth, measured in the same run: the memory
floor each model's latency is measured against.

Each cache is first filled to the context length: the Transformer's KV cache with random keys and values
of that length, DLA's cache with a full set of K random states at that position (what any context of
that length leaves; a decode step's cost does not depend on the contents); the gated delta model's state
does not grow, so its cache is its state after a short prompt. Then the next tokens are decoded one at a
time. Then one layer's one-token op alone, in MLX and in PyTorch, against the single-state base of each.
Writes OUT.json and OUT.png and prints a markdown table.

    python scripts/bench_decode.py --lengths 512 2048 8192 32768 --out bench/decode_cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from mlx.utils import tree_flatten
from mlx_lm.models import llama, qwen3_next
from mlx_lm.models.cache import KVCache
from mlx_lm.models.gated_delta import gated_delta_ops

import dla_torch
from dla_mlx import dla_attention
from dla_mlx.models import dla_gated_deltanet as dla
from dla_mlx.models.base import dla_mixers, set_state
from dla_shared import DLAConfig, DLAState, decode
from dla_shared.plot import pyplot
from dla_torch.ops.attention import empty_state as torch_empty_state
from dla_torch.ops.fla_naive import load


def dla_model(width, layers, heads, capacity):
    args = dla.ModelArgs(vocab_size=1024, hidden_size=width, num_hidden_layers=layers, num_heads=heads,
                         head_dim=width // heads, expand_v=1.0, dla={"policy": "dla", "capacity": capacity})
    return dla.Model(args)


def transformer(width, layers, heads, mlp):
    args = llama.ModelArgs(model_type="llama", hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=heads, intermediate_size=mlp, rms_norm_eps=1e-5,
                           vocab_size=1024, rope_theta=10000.0)
    return llama.Model(args)


def gated_delta(width, layers, heads, mlp):
    """mlx-lm's Qwen3-Next with a dense MLP and no attention layer: every layer is a gated delta layer."""
    D = width // heads
    args = qwen3_next.ModelArgs(
        model_type="qwen3_next", hidden_size=width, num_hidden_layers=layers, intermediate_size=mlp,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=D, linear_num_value_heads=heads,
        linear_num_key_heads=heads, linear_key_head_dim=D, linear_value_head_dim=D, linear_conv_kernel_dim=4,
        num_experts=0, num_experts_per_tok=1, decoder_sparse_step=1, shared_expert_intermediate_size=0,
        mlp_only_layers=[], moe_intermediate_size=0, rms_norm_eps=1e-6, vocab_size=1024, rope_theta=10000.0,
        partial_rotary_factor=1.0, max_position_embeddings=2**20, full_attention_interval=layers + 1)
    model = qwen3_next.Model(args)
    model.model.fa_idx = None  # no attention layer to take a mask for
    return model


def filled_dla_cache(model, T):
    a = model.args
    K, H, D, Dv = a.dla.capacity, a.num_heads, a.head_dim, a.head_v_dim
    cache = model.make_cache()
    for c in cache:
        key_dim, value_dim = H * D, H * Dv
        for i, dim in enumerate((key_dim, key_dim, value_dim)):
            c[i] = mx.random.normal((1, a.conv_size - 1, dim))
        n = np.full((1, H, K), T // K, np.int64)
        n[..., 0] += T - n.sum(-1)
        state = DLAState(mx.random.normal((1, H, K, D, Dv)) * 0.1, mx.array(n), mx.random.uniform(shape=(1, H, K)),
                         mx.array([T], dtype=mx.int64), mx.zeros((1, H), dtype=mx.int64),
                         config=dla_mixers(model)[0].op_config())
        set_state(c, model.conv_states, state)
    return cache


def filled_kv_cache(model, T):
    cache = [KVCache() for _ in model.layers]
    heads, dim = model.args.num_key_value_heads, model.args.hidden_size // model.args.num_attention_heads
    for c in cache:
        c.update_and_fetch(mx.random.normal((1, heads, T, dim)), mx.random.normal((1, heads, T, dim)))
    return cache


def filled_gated_delta_cache(model, T):
    cache = model.make_cache()
    model(mx.array([[1, 2, 3]]), cache=cache)
    return cache


def decode_latency(model, cache, steps):
    """Median seconds per decoded token over ``steps`` tokens (after two warm-up steps)."""
    token, times = mx.array([[1]]), []
    for i in range(steps + 2):
        start = time.perf_counter()
        logits = model(token, cache=cache)
        mx.eval(logits, [c.state for c in cache])
        if i >= 2:
            times.append(time.perf_counter() - start)
        token = mx.argmax(logits[:, -1:], axis=-1)
    return float(np.median(times))


def op_latency(heads, dim, capacity, steps):
    """Median seconds of one layer's one-token op: DLA's (the MLX step, the C step, also with the diagonal
    transition, the reference, from a full cache of K states) and mlx-lm's gated delta ops path (one state), on
    the same shapes."""
    mx.random.seed(1)
    q, k, v = (mx.random.normal((1, 1, heads, dim)) for _ in range(3))
    k = k / mx.linalg.norm(k, axis=-1, keepdims=True)
    g, beta = -0.1 * mx.random.uniform(shape=(1, 1, heads)), mx.random.uniform(shape=(1, 1, heads))
    config = DLAConfig(policy="dla", capacity=capacity)
    L = config.num_slots
    state = DLAState(0.1 * mx.random.normal((1, heads, L, dim, dim)), mx.full((1, heads, L), 17, dtype=mx.int64),
                     mx.random.uniform(shape=(1, heads, L)), mx.array([17 * L]), mx.zeros((1, heads), dtype=mx.int64),
                     config=config)
    lam = mx.ones((1, 1, heads, L))
    dla = lambda impl, b=beta: lambda: dla_attention(q, k, v, g, lam, b, config=config, initial_state=state,
                                                     impl=impl, output_final_state=True)[1].S
    runs = {"dla_step": dla("step"), "dla_cpu": dla("cpu"), "dla_cpu_diagonal": dla("cpu", None),
            "dla_reference": dla("reference"),
            "gated_delta_ops": lambda: gated_delta_ops(q, k, v, mx.exp(g), beta, state.S[:, :, 0])[1]}
    if not decode.available():  # built without a C compiler
        del runs["dla_cpu"], runs["dla_cpu_diagonal"]
    return {name: median_seconds(lambda fn=fn: mx.eval(fn()), steps) for name, fn in runs.items()}


def torch_op_latency(heads, dim, capacity, steps):
    """The same for dla_torch (one thread): the torch step, the C step (what decoding on the CPU uses; also with
    the diagonal transition, and each donating its state, as the torch models' caches do: every call continues
    the last one's state), the chunk path at T = 1, the reference, and fla's pure-torch recurrent gated delta
    rule for one token (one state)."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, heads, dim, generator=gen) for _ in range(3))
    k = k / k.norm(dim=-1, keepdim=True)
    g, beta = -0.1 * torch.rand(1, 1, heads, generator=gen), torch.rand(1, 1, heads, generator=gen)
    config = DLAConfig(policy="dla", capacity=capacity)
    L = config.num_slots
    state = torch_empty_state(1, heads, L, dim, dim)
    state.S.normal_(generator=gen).mul_(0.1)
    state.n.fill_(17)
    state.ibar.uniform_(generator=gen)
    state.pos.fill_(17 * L)
    lam = torch.ones(1, 1, heads, L)
    naive = load("gated_delta_rule").naive_recurrent_gated_delta_rule
    dla = lambda impl, b=beta: lambda: dla_torch.dla_attention(q, k, v, g, lam, b, config=config, initial_state=state,
                                                               impl=impl, output_final_state=True, check_decay=False)

    def donated(b):
        chain = [dataclasses.replace(state, S=state.S.clone())]
        return lambda: chain.append(dla_torch.dla_attention(q, k, v, g, lam, b, config=config, impl="cpu",
                                                            initial_state=chain.pop(), output_final_state=True,
                                                            check_decay=False, donate_state=True)[1])

    runs = {"dla_step": dla("step"), "dla_cpu": dla("cpu"), "dla_cpu_diagonal": dla("cpu", None),
            "dla_cpu_donated": donated(beta), "dla_cpu_diagonal_donated": donated(None), "dla_chunk": dla("chunk"),
            "dla_reference": dla("reference"),
            "fla_recurrent": lambda: naive(q, k, v, beta, g, initial_state=state.S[:, :, 0],
                                           output_final_state=True)}
    if not decode.available():
        for name in [name for name in runs if name.startswith("dla_cpu")]:
            del runs[name]
    with torch.no_grad():
        return {name: median_seconds(fn, steps) for name, fn in runs.items()}


def median_seconds(fn, steps):
    """Median seconds of ``fn()`` over ``steps`` calls, after two warm-up calls."""
    samples = []
    for i in range(steps + 2):
        start = time.perf_counter()
        fn()
        if i >= 2:
            samples.append(time.perf_counter() - start)
    return float(np.median(samples))


def state_bytes(cache):
    return int(sum(c.nbytes for c in cache))


def bytes_per_token(model, cache):
    """The least one token moves: every weight once (of an embedding table that is not the output head, the
    one row looked up), a KV cache's filled part read, recurrent states read and written."""
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    if not model.args.tie_word_embeddings:
        table = model.model.embed_tokens if hasattr(model.model, "embed_tokens") else model.model.embeddings
        weights -= table.weight.nbytes - table.weight[0].nbytes
    if isinstance(cache[0], KVCache):
        return weights + sum(c.keys[..., : c.offset, :].nbytes + c.values[..., : c.offset, :].nbytes for c in cache)
    return weights + 2 * state_bytes(cache)


def copy_bandwidth(size=2**26, repeats=5):
    """Bytes read plus written per second by numpy copying ``size`` bytes (best of ``repeats``)."""
    src = np.ones(size // 4, np.float32)
    dst = np.empty_like(src)
    return 2 * size / min(median_seconds(lambda: np.copyto(dst, src), 1) for _ in range(repeats))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--capacity", type=int, default=30)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--out", default="bench/decode_cpu")
    args = p.parse_args(argv)
    mx.random.seed(0)
    dla = dla_model(args.width, args.layers, args.heads, args.capacity)
    mlp = dla.args.intermediate_size
    models = {"dla": dla, "transformer": transformer(args.width, args.layers, args.heads, mlp),
              "gated_delta": gated_delta(args.width, args.layers, args.heads, mlp)}
    fill = {"dla": filled_dla_cache, "transformer": filled_kv_cache, "gated_delta": filled_gated_delta_cache}
    rows, bandwidth = [], copy_bandwidth()
    for T in args.lengths:
        for name, model in models.items():
            cache = fill[name](model, T)
            moved = bytes_per_token(model, cache)
            rows.append({"T": T, "model": name, "latency_s": decode_latency(model, cache, args.steps),
                         "state_bytes": state_bytes(cache), "bytes_per_token": moved,
                         "floor_s": moved / bandwidth})
            print(rows[-1], flush=True)
    ops = op_latency(args.heads, args.width // args.heads, args.capacity, args.steps)
    print(ops, flush=True)
    torch_ops = torch_op_latency(args.heads, args.width // args.heads, args.capacity, args.steps)
    print(torch_ops, flush=True)
    meta = {"device": str(mx.default_device()), "machine": platform.machine(), "mlx": mx.__version__,
            "copy_bandwidth_bytes_s": bandwidth} | vars(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "one_layer_op_s": ops,
                                                     "torch_one_layer_op_s": torch_ops}, indent=2))
    plot(rows, meta, out.with_suffix(".png"))
    by = {(r["T"], r["model"]): r for r in rows}
    print("| context | DLA ms/token | Transformer ms/token | gated delta ms/token | DLA / Transformer | "
          "DLA / gated delta | DLA state (MB) | KV cache (MB) | memory floor DLA / Transformer / gated delta (ms) "
          "| floor ratio DLA / Transformer |\n|---|---|---|---|---|---|---|---|---|---|")
    for T in args.lengths:
        d, t, s = by[(T, "dla")], by[(T, "transformer")], by[(T, "gated_delta")]
        print(f"| {T} | {1e3 * d['latency_s']:.2f} | {1e3 * t['latency_s']:.2f} | {1e3 * s['latency_s']:.2f} | "
              f"{d['latency_s'] / t['latency_s']:.2f} | {d['latency_s'] / s['latency_s']:.2f} | "
              f"{d['state_bytes'] / 2**20:.1f} | {t['state_bytes'] / 2**20:.1f} | "
              f"{1e3 * d['floor_s']:.1f} / {1e3 * t['floor_s']:.1f} / {1e3 * s['floor_s']:.1f} | "
              f"{d['floor_s'] / t['floor_s']:.2f} |")
    print(f"copy bandwidth (read + written): {bandwidth / 1e9:.1f} GB/s")
    first, last = by[(args.lengths[0], "dla")], by[(args.lengths[-1], "dla")]
    print(f"DLA latency at {args.lengths[-1]} / at {args.lengths[0]}: {last['latency_s'] / first['latency_s']:.2f}")
    base = ops["gated_delta_ops"]
    print("MLX, one layer's op: " + ", ".join(
        f"{name} {1e3 * t:.2f} ms ({t / base:.1f}x mlx-lm's gated delta ops)" for name, t in ops.items()))
    base = torch_ops["fla_recurrent"]
    print("torch, one layer's op, one thread: " + ", ".join(
        f"{name} {1e3 * t:.2f} ms ({t / base:.1f}x fla's recurrent)" for name, t in torch_ops.items()))
    return 0


def plot(rows, meta, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in (("dla", "o-"), ("transformer", "s--"), ("gated_delta", "^:")):
        sel = [r for r in rows if r["model"] == name]
        axes[0].plot([r["T"] for r in sel], [1e3 * r["latency_s"] for r in sel], style, label=name)
        axes[1].plot([r["T"] for r in sel], [r["state_bytes"] / 2**20 for r in sel], style, label=name)
    for ax, label in zip(axes, ("ms per decoded token", "cached state (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"decode on {meta['device']}: width {meta['width']}, {meta['layers']} layers, K={meta['capacity']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
