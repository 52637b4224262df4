"""Where did a model's state cache put its boundaries? Runs an MLX DLA model over a text, records the inputs
of one layer's DLA op, and replays them through `dla_shared.inspect` (the oracle) for a `Trace`."""

from __future__ import annotations

import contextlib
import importlib

import mlx.core as mx
import numpy as np

from dla_shared import Trace, inspect


@contextlib.contextmanager
def _recording(model, calls: list):
    """Within the block, every call of the model module's DLA op appends its arguments to ``calls``."""
    module = importlib.import_module(type(model).__module__)
    op = module.dla_attention

    def record(q, k, v, g, lam=None, beta=None, **kw):
        calls.append({"q": q, "k": k, "g": g, "v": v, "beta": beta, "config": kw["config"]})
        return op(q, k, v, g, lam, beta, **kw)

    module.dla_attention = record
    try:
        yield
    finally:
        module.dla_attention = op


def trace_text(model, ids, layer: int = 0) -> Trace:
    """The cache's decisions in ``layer`` over token ids [T] (one row, every head)."""
    calls = []
    with _recording(model, calls):
        mx.eval(model(mx.array(ids)[None]))
    if not 0 <= layer < len(calls):
        raise ValueError(f"layer must be in [0, {len(calls)}), got {layer}")
    c = calls[layer]
    host = lambda x: None if x is None else np.array(x.astype(mx.float32)).astype(np.float64)
    return inspect(host(c["q"]), host(c["k"]), host(c["v"]), host(c["g"]), host(c["beta"]), config=c["config"])


def mark_boundaries(pieces: list[str], trace: Trace, head: int = 0, marker: str = "|") -> str:
    """The text with ``marker`` before every token that opened a state (``pieces``: one string per token)."""
    opened = trace.opened[0, :, head]
    return "".join((marker if opened[t] and t > 0 else "") + piece for t, piece in enumerate(pieces))
