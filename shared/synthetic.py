"""Synthetic streams for the paper's mechanism claims, and Theorem 3.1's deviation bound.

Sequences here are single-head ``[T, D]`` numpy arrays; `as_batch` turns them into op inputs
``[1, T, 1, D]``. Token contributions are ``u_t = vec(k_t v_t^T)``, as in the paper's bound.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Stream(NamedTuple):
    k: np.ndarray  # [T, Dk], unit norm
    v: np.ndarray  # [T, Dv], unit norm
    change_points: np.ndarray  # positions where a new segment starts (0 included)


def piecewise_stream(segments=8, length=10, Dk=16, Dv=16, noise=0.02, seed=0) -> Stream:
    """Piecewise-constant keys and values: ``segments`` runs of ``length`` +- 3 tokens around random
    unit prototypes, plus ``noise`` (relative, per token). Segments are well separated: the prototypes
    of neighbours are independent random directions."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, length - 3), length + 4, size=segments)
    change_points = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    ks, vs = [], []
    for n in lengths:
        for dim, out in ((Dk, ks), (Dv, vs)):
            proto = _unit(rng.standard_normal(dim))
            out.append(_unit(proto + noise * rng.standard_normal((n, dim)) / np.sqrt(dim)))
    return Stream(np.concatenate(ks), np.concatenate(vs), change_points)


def needle_stream(segments=8, length=10, Dk=16, Dv=16, noise=0.02, seed=0, where=0.3) -> tuple[Stream, int]:
    """A piecewise haystack with one needle token (an unrelated key and value) inserted at about
    ``where`` of the way through; returns the stream and the needle's position."""
    hay = piecewise_stream(segments, length, Dk, Dv, noise, seed)
    rng = np.random.default_rng(seed + 1)
    at = int(where * len(hay.k))
    k = np.insert(hay.k, at, _unit(rng.standard_normal(Dk)), axis=0)
    v = np.insert(hay.v, at, _unit(rng.standard_normal(Dv)), axis=0)
    change_points = np.sort(np.concatenate([np.where(hay.change_points > at, hay.change_points + 1,
                                                     hay.change_points), [at, at + 1]]))
    return Stream(k, v, np.unique(change_points)), at


def as_batch(stream: Stream, g: float = 0.0):
    """Op inputs for one row and head: q = k (unused by the bound), v, constant log decay g."""
    T = len(stream.k)
    k = stream.k[None, :, None]
    return {"q": k, "k": k, "v": stream.v[None, :, None], "g": np.full((1, T, 1), g)}


def deviation_bound(k: np.ndarray, v: np.ndarray, spans) -> float:
    """Theorem 3.1's q-independent factor B(pi) = sum_i sqrt(|C_i|) sqrt(sum_{t in C_i} ||u_t - mean_i||^2)
    for the partition of the tokens into ``spans`` [(start, end), ...], with u_t = vec(k_t v_t^T)."""
    u = (k[:, :, None] * v[:, None, :]).reshape(len(k), -1)
    total = 0.0
    for start, end in spans:
        if end > start:
            block = u[start:end]
            total += np.sqrt(end - start) * np.sqrt(((block - block.mean(0)) ** 2).sum())
    return float(total)


def needle_recall(S: np.ndarray, key: np.ndarray, value: np.ndarray) -> float:
    """How cleanly one state holds the needle: the best cosine between a state's read with the
    needle's key and the needle's value, ``max_i cos(key^T S_i, value)`` over states S [L, Dk, Dv].
    This is the read a model gets when its read weights pick that one state."""
    reads = np.einsum("k,lkv->lv", key, S)
    norms = np.linalg.norm(reads, axis=-1) * np.linalg.norm(value)
    cos = np.where(norms > 0, reads @ value / np.where(norms > 0, norms, 1), -1)
    return float(cos.max())


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
