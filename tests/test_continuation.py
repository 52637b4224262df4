"""Any split of a sequence, carried through the state object, equals one pass."""

import mlx.core as mx
import numpy as np
import pytest
import torch

import dla_mlx
import dla_shared
import dla_torch

from helpers import NAMES, POLICIES, assert_close, assert_states_close, config_for, make_inputs, to_mlx, to_torch

BACKENDS = {  # name: (op, convert inputs, convert outputs, impl)
    "oracle": (dla_shared.dla_attention, lambda x: x, lambda o: o, None),
    "torch-reference": (dla_torch.dla_attention, to_torch, lambda o: o.numpy(), "reference"),
    "torch-chunk": (dla_torch.dla_attention, to_torch, lambda o: o.numpy(), "chunk"),
    "mlx-reference": (dla_mlx.dla_attention, to_mlx, np.array, "reference"),
    "mlx-chunk": (dla_mlx.dla_attention, to_mlx, np.array, "chunk"),
}
# A chunk boundary moves with the split; MLX's float32-accurate exp (even on float64) then shows.
TOLERANCE = {"mlx-chunk": 1e-6}
SPLITS = [pytest.param(c, id="-".join(map(str, c))) for c in [(0,), (1,), (13,), (5, 6, 29), (40,)]]


def run_in_pieces(backend, config, x, cuts, mask=None):
    attention, convert, back, impl = BACKENDS[backend]
    kw = {} if impl is None else {"impl": impl}
    T = x["q"].shape[1]
    bounds = [0, *cuts, T]
    state, outputs = None, []
    for s, e in zip(bounds[:-1], bounds[1:]):
        piece = [None if x[n] is None else convert(x[n][:, s:e]) for n in NAMES]
        piece_mask = {"oracle": np.asarray, "torch": torch.tensor, "mlx": mx.array}[backend.split("-")[0]](mask[:, s:e])
        o, state = attention(*piece, config=config, mask=piece_mask, initial_state=state, output_final_state=True,
                             **kw)
        outputs.append(back(o))
    return np.concatenate(outputs, axis=1), state


@pytest.mark.parametrize("cuts", SPLITS)
@pytest.mark.parametrize("delta", [False, True], ids=["diagonal", "delta"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_split_equals_one_pass(backend, policy, delta, cuts):
    config = config_for(policy)
    x = make_inputs(config, 2, 40, 2, 4, 3, delta=delta, seed=21)
    mask = np.ones((2, 40), bool)
    mask[1, :4] = False
    mask[1, 20:23] = False
    whole, whole_state = run_in_pieces(backend, config, x, (), mask)
    split, split_state = run_in_pieces(backend, config, x, cuts, mask)
    tol = TOLERANCE.get(backend, 1e-12)
    assert_close("o", whole, split, tol)
    assert_states_close(whole_state, split_state, tol)
