"""Recall tasks for language models: multi-query associative recall (MQAR) and needle in a haystack.

Token sequences with answer targets, for training and scoring small models (``scripts/recall_experiment.py``).
The vocabulary is split into ranges so that every role is unambiguous:

==========  ==============================  ==========================================
range       tokens                          role
==========  ==============================  ==========================================
0           ``PAD``                         filler / padding
1           ``QUERY``                       marks the question of a needle sequence
[2, 2+K)    keys                            K = ``num_keys``
[2+K, V)    values                          V = ``vocab_size``
==========  ==============================  ==========================================

MQAR (Zoology): ``k1 v1 k2 v2 ... kP vP`` then filler, then the keys again in a random order, each
followed by its value: the model must predict each value from its key. Needle: random key-value noise
pairs as haystack, one needle pair ``k v`` placed at a chosen depth, and at the end ``QUERY k`` whose
next token must be ``v``. ``targets[i, t]`` is the token expected at ``t + 1`` where it is scored, and
``IGNORE`` elsewhere; ``answers`` recovers the same targets from the sequence alone.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

PAD, QUERY, IGNORE = 0, 1, -100


class RecallBatch(NamedTuple):
    inputs: np.ndarray  # int64 [N, T]
    targets: np.ndarray  # int64 [N, T]: the next token where scored, IGNORE elsewhere


def _check(vocab_size, num_keys, pairs, seq_len, needed):
    if num_keys < pairs:
        raise ValueError(f"num_keys ({num_keys}) must be at least the number of pairs ({pairs})")
    if vocab_size - 2 - num_keys < 2:
        raise ValueError(f"vocab_size ({vocab_size}) leaves fewer than 2 value tokens after {num_keys} keys")
    if seq_len < needed:
        raise ValueError(f"seq_len ({seq_len}) is too short: this task needs at least {needed} tokens")


def mqar(n: int, seq_len: int, pairs: int, vocab_size: int = 256, num_keys: int = 64, seed=0) -> RecallBatch:
    """``n`` MQAR sequences of ``seq_len`` tokens with ``pairs`` distinct keys each."""
    _check(vocab_size, num_keys, pairs, seq_len, 4 * pairs)
    rng = np.random.default_rng(seed)
    inputs = np.full((n, seq_len), PAD, np.int64)
    targets = np.full((n, seq_len), IGNORE, np.int64)
    for i in range(n):
        keys = 2 + rng.choice(num_keys, pairs, replace=False)
        values = 2 + num_keys + rng.integers(0, vocab_size - 2 - num_keys, pairs)
        inputs[i, : 2 * pairs : 2], inputs[i, 1 : 2 * pairs : 2] = keys, values
        order = rng.permutation(pairs)
        start = seq_len - 2 * pairs  # the queries fill the end of the sequence
        inputs[i, start::2], inputs[i, start + 1 :: 2] = keys[order], values[order]
        targets[i, start::2] = values[order]
    return RecallBatch(inputs, targets)


def needle(n: int, seq_len: int, depth: float = 0.5, vocab_size: int = 256, num_keys: int = 64,
           seed=0) -> RecallBatch:
    """``n`` needle sequences: a haystack of random pairs (whose keys differ from the needle's), the needle
    pair at relative ``depth`` in [0, 1], then ``QUERY key`` at the end."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    _check(vocab_size, num_keys, 2, seq_len, 6)
    rng = np.random.default_rng(seed)
    inputs = np.full((n, seq_len), PAD, np.int64)
    targets = np.full((n, seq_len), IGNORE, np.int64)
    haystack = (seq_len - 3) // 2  # pairs before the query (the needle is one of them)
    for i in range(n):
        key = 2 + rng.integers(num_keys)
        others = 2 + (key - 2 + 1 + rng.integers(0, num_keys - 1, haystack)) % num_keys
        values = 2 + num_keys + rng.integers(0, vocab_size - 2 - num_keys, haystack)
        at = min(int(round(depth * (haystack - 1))), haystack - 1)
        others[at] = key
        inputs[i, : 2 * haystack : 2], inputs[i, 1 : 2 * haystack : 2] = others, values
        inputs[i, seq_len - 3 : seq_len - 1] = QUERY, key
        inputs[i, seq_len - 1] = values[at]
        targets[i, seq_len - 2] = values[at]
    return RecallBatch(inputs, targets)


def answers(inputs: np.ndarray, num_keys: int = 64) -> np.ndarray:
    """The targets of a batch recovered from its tokens alone (int64 [N, T]). A needle sequence (one with
    ``QUERY``) asks for the value that followed the queried key in the haystack; an MQAR sequence asks, at
    every repeated key, for the value that followed the key's first occurrence."""
    out = np.full(inputs.shape, IGNORE, np.int64)
    for i, row in enumerate(inputs.tolist()):
        is_key = lambda t: 2 <= row[t] < 2 + num_keys
        if QUERY in row:
            t = row.index(QUERY) + 1
            out[i, t] = row[row.index(row[t]) + 1]
            continue
        first = {}
        for t in range(len(row) - 1):
            if is_key(t):
                if row[t] in first:
                    out[i, t] = first[row[t]]
                else:
                    first[row[t]] = row[t + 1]
    return out


def accuracy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of scored positions whose argmax is the target: logits [N, T, V], targets [N, T]."""
    scored = targets != IGNORE
    if not scored.any():
        raise ValueError("targets score no position")
    return float((logits.argmax(-1)[scored] == targets[scored]).mean())
