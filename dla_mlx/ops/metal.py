"""The Metal kernels (`metal_kernels/`, shipped as `dla_metal_kernels`) and how they are launched.

Each kernel mirrors an ops path that is its fallback and its test oracle:

- ``dla_decode``: one token for every (row, head), transition, score, decisions, merges, write and read
  in one pass; the mirror of `dla_mlx.ops.reference` for T = 1. It reads a state in either layout
  (`dla_shared.state`; the models' caches keep the physical one) and writes the canonical one.
- ``dla_scan``: the decisions of the chunkwise prefill (``sigma``); the mirror of `dla_shared.scan`.

A `Launch` holds everything ``mx.fast.metal_kernel`` is given (sources, input and output names, inputs,
template arguments, grid, threadgroup, output shapes), so that the CPU emulation harness in ``tests/`` runs
exactly what a Mac runs. Kernels compute in float32; they are built once per process.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import NamedTuple

import mlx.core as mx

from dla_shared import policy
from dla_shared.state import DLAState, canonical, physical

from .chunk import dla_chunk

HEADER = "dla_common.h"
NAMES = {  # kernel: (input names, output names)
    "dla_decode": (["q", "k", "v", "g", "beta", "lam", "S_in", "slot", "S_decay", "n_in", "ibar_in", "opened_in",
                    "pos", "active",
                    "scale", "threshold", "eps", "block_size"], ["out", "S_out", "n_out", "ibar_out", "opened_out"]),
    "dla_scan": (["k", "v", "g", "beta", "active", "X_in", "n_in", "ibar_in", "opened_in", "pos", "T", "threshold",
                  "eps", "block_size"], ["sigma", "n_out", "ibar_out", "opened_out"]),
}


class Launch(NamedTuple):
    name: str  # a key of NAMES; the source is metal_kernels/<name>.metal
    inputs: list  # arrays and scalars, in the order of NAMES[name][0]
    template: list  # [(name, int or bool)]
    grid: tuple
    threadgroup: tuple
    output_shapes: list
    output_dtypes: list


def source(file: str) -> str:
    """The text of one file of ``metal_kernels/``."""
    return resources.files("dla_metal_kernels").joinpath(file).read_text()


@functools.cache
def kernel(name: str):
    input_names, output_names = NAMES[name]
    return mx.fast.metal_kernel(name=name, input_names=input_names, output_names=output_names,
                                header=source(HEADER), source=source(f"{name}.metal"))


def run(launch: Launch) -> list:
    """Run a launch on the Metal device."""
    return kernel(launch.name)(inputs=launch.inputs, template=launch.template, grid=launch.grid,
                               threadgroup=launch.threadgroup, output_shapes=launch.output_shapes,
                               output_dtypes=launch.output_dtypes)


def decode_launch(config, q, k, v, g, lam, beta, active, state: DLAState, scale) -> Launch:
    """One token: q, k [B, H, Dk], v [B, H, Dv], g and beta (or None) [B, H], lam [B, H, L], active bool [B];
    ``state`` in either layout. Outputs: o [B, H, Dv], S [B, H, L, Dk, Dv] (canonical layout), n int32
    [B, H, L], ibar [B, H, L], opened int32 [B, H]."""
    B, H, Dk = q.shape
    Dv, L = v.shape[-1], state.S.shape[2]
    f32 = lambda x: x.astype(mx.float32)
    delta = beta is not None
    beta = f32(beta) if delta else mx.zeros((B, H))
    state = physical(state, mx.arange, mx.ones)
    inputs = [f32(q), f32(k), f32(v), f32(g), beta, f32(lam), f32(state.S), state.slot.astype(mx.int32),
              f32(state.decay), state.n.astype(mx.int32),
              f32(state.ibar), state.opened.astype(mx.int32), state.pos.astype(mx.int32), active, float(scale),
              _thresholds(config, H), float(config.eps), int(config.block_size)]
    nsg = -(-Dv // 32)
    return Launch("dla_decode", inputs, _template(config, Dk, Dv, L, H, nsg, delta),
                  (32 * nsg, 1, B * H), (32 * nsg, 1, 1),
                  [(B, H, Dv), (B, H, L, Dk, Dv), (B, H, L), (B, H, L), (B, H)],
                  [mx.float32, mx.float32, mx.int32, mx.float32, mx.int32])


def scan_launch(config, k, v, g, beta, active, X, n, ibar, pos, opened, chunk_size) -> Launch:
    """The decisions of a [B, T] block (arguments as `dla_shared.scan`, as MLX arrays). Outputs:
    sigma int16 [B, H, T, L + C], n int32 [B, H, L], ibar [B, H, L], opened int32 [B, H]."""
    B, T, H, Dk = k.shape
    Dv, L = v.shape[-1], n.shape[-1]
    f32 = lambda x: x.astype(mx.float32)
    beta_in = mx.zeros((B, T, H)) if beta is None else f32(beta)
    inputs = [f32(k), f32(v), f32(g), beta_in, active, f32(X), n.astype(mx.int32), f32(ibar), opened.astype(mx.int32),
              pos.astype(mx.int32), int(T), _thresholds(config, H), float(config.eps), int(config.block_size)]
    nsg = -(-Dv // 32)
    template = _template(config, Dk, Dv, L, H, nsg, beta is not None) + [("C", int(chunk_size))]
    return Launch("dla_scan", inputs, template, (32 * nsg, 1, B * H), (32 * nsg, 1, 1),
                  [(B, H, T, L + chunk_size), (B, H, L), (B, H, L), (B, H)], [mx.int16, mx.int32, mx.float32, mx.int32])


def _thresholds(config, H):
    """Every head's threshold, float32 [H]."""
    return mx.array(config.thresholds(H), dtype=mx.float32)


def _template(config, Dk, Dv, L, H, nsg, delta):
    return [("Dk", Dk), ("Dv", Dv), ("L", L), ("H", H), ("NSG", nsg),
            ("POLICY", policy.POLICY_IDS[config.policy]), ("MERGE", policy.MERGE_IDS[config.merge]),
            ("SCORE", policy.SCORE_IDS[config.score]), ("DELTA", delta), ("SCORED", config.scored)]


def metal_scan(config, k, v, g, beta, active, state: DLAState, chunk_size):
    """`dla_mlx.ops.chunk.host_scan` with the ``dla_scan`` kernel: sigma int32 [B, H, T, L + C],
    (n, ibar, pos, opened)."""
    active = mx.array(active)
    k, v, g = (mx.stop_gradient(x) for x in (k, v, g))
    beta = None if beta is None else mx.stop_gradient(beta)
    pos = state.pos + active.astype(mx.int64).sum(-1)
    policy.check_levels(config, int(pos.max()) if pos.size else 0)
    sigma, n, ibar, opened = run(scan_launch(config, k, v, g, beta, active, state.S[:, :, 0], state.n, state.ibar,
                                             state.pos, state.opened, chunk_size))
    return sigma.astype(mx.int32), (n.astype(mx.int64), ibar.astype(state.S.dtype), pos, opened.astype(mx.int64))


def dla_metal(q, k, v, g, lam, beta, mask, state: DLAState, *, config, scale):
    """One token: the ``dla_decode`` kernel; longer blocks: the chunk path with the ``dla_scan`` kernel."""
    if q.dtype == mx.float64:
        raise ValueError("impl='metal' computes in float32; use impl='chunk' or 'reference' for float64 inputs")
    B, T = q.shape[:2]
    if T != 1:
        state = canonical(state, mx.take_along_axis)
        return dla_chunk(q, k, v, g, lam, beta, mask, state, config=config, scale=scale, decide=metal_scan)
    active = mx.ones((B,), dtype=mx.bool_) if mask is None else mask[:, 0]
    pos = state.pos + active.astype(mx.int64)
    policy.check_levels(config, int(pos.max()) if pos.size else 0)
    first = lambda x: None if x is None else x[:, 0]
    o, S, n, ibar, opened = run(decode_launch(config, q[:, 0], k[:, 0], v[:, 0], g[:, 0], lam[:, 0], first(beta),
                                              active, state, scale))
    return o[:, None].astype(q.dtype), DLAState(S, n.astype(mx.int64), ibar, pos, opened.astype(mx.int64))
