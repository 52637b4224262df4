"""The recurrent oracle and references vs the materialized form (the second oracle, DESIGN section 2)."""

import numpy as np
import pytest
import torch

import dla_shared
import dla_torch
from dla_shared.materialized import base_attention, materialized_attention

from helpers import NAMES, POLICIES, TRANSITIONS, assert_close, config_for, make_inputs, to_torch


@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_recurrent_equals_materialized(policy, delta):
    config = config_for(policy)
    x = make_inputs(config, 2, 50, 2, 5, 4, delta=delta, seed=31)
    mask = np.ones((2, 50), bool)
    mask[1, :6] = False
    mask[0, 20:24] = False
    expected = materialized_attention(*(x[n] for n in NAMES), config=config, scale=0.7, mask=mask)
    o, _ = dla_shared.dla_attention(*(x[n] for n in NAMES), config=config, scale=0.7, mask=mask)
    assert_close("oracle float64", expected, o, 1e-10)
    o32, _ = dla_torch.dla_attention(*(to_torch(x[n], torch.float32) for n in NAMES), config=config, scale=0.7,
                                     mask=torch.tensor(mask))
    assert_close("torch float32", expected, o32, 1e-5)


def test_base_attention_delta_rule_equals_a_dense_product():
    """A[t, s] = q_t^T M_t ... M_{s+1} k_s beta_s, with the product of Dk x Dk matrices written out."""
    rng = np.random.default_rng(0)
    T, D = 9, 4
    q, k = rng.standard_normal((2, T, D))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    g, beta = -rng.random(T), rng.random(T)
    M = [np.exp(g[j]) * (np.eye(D) - beta[j] * np.outer(k[j], k[j])) for j in range(T)]
    expected = np.zeros((T, T))
    for t in range(T):
        for s in range(t + 1):
            P = np.eye(D)
            for j in range(s + 1, t + 1):
                P = M[j] @ P
            expected[t, s] = q[t] @ P @ k[s] * beta[s]
    np.testing.assert_allclose(base_attention(q, k, g, beta), expected, atol=1e-12)
