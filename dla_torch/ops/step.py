"""Token-by-token DLA in PyTorch with the decisions on the device: the path `auto` takes to decode.

The mirror of `dla_mlx.ops.step`: the computation of `dla_torch.ops.reference` (DESIGN section 2), arranged so
that a token reads the K states once and writes them once, with no host round trip (no sync on CUDA):

- q and k are contracted with the old states together (``reads`` [B, H, L, 2, Dv]);
- the score needs only the newest state after its transition; the decisions are `dla_shared.policy.plan`
  in torch ops (the namespace `Torch`), from bookkeeping on the states' device;
- moves commute with the transition, so the states move first, with the decay folded in (a product and a
  shifted add, or one fold for fenwick), and ``reads`` move with them;
- the output is assembled from the moved ``reads``, so the new states are written and never read back.

Eager torch ops: differentiable in q, k, v, g, beta, lam and the states as the reference is (not in the
decisions). On the CPU without gradients `dla_cpu` runs the same step compiled (`dla_shared.decode`), the
CPU's counterpart of the Triton and Metal kernels. Shapes as in `dla_torch.dla_attention`.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from dla_shared import decode, policy
from dla_shared.state import DLAState

from .chunk import needs_grad


class Torch:
    """The numpy functions `dla_shared.policy` calls, for torch tensors on one device, with numpy's results:
    arrays are made on the device; thresholds and densities are compared in float64, as numpy promotes them;
    ``maximum`` / ``minimum`` take Python numbers without a host-to-device copy (a sync on CUDA). The rest is
    torch's own."""

    def __init__(self, device):
        self.device = device

    def __getattr__(self, name):
        return getattr(torch, name)

    def arange(self, n):
        return torch.arange(n, device=self.device)

    def full(self, shape, value):
        return torch.full(shape, value, device=self.device)

    def array(self, x):  # the thresholds: 1-D, so that a float32 score is promoted to float64 against it
        return _constant(x, self.device)

    def flip(self, x, axis):
        return torch.flip(x, (axis,))

    def divide(self, x, y):  # numpy divides float32 by int64 in float64
        return torch.div(x.double(), y)

    def maximum(self, x, y):
        return x.clamp(min=y) if isinstance(y, (int, float)) else torch.maximum(x, y)

    def minimum(self, x, y):
        return x.clamp(max=y) if isinstance(y, (int, float)) else torch.minimum(x, y)


@functools.lru_cache(maxsize=64)
def _constant(x, device):
    return torch.tensor(x, dtype=torch.float64, device=device).reshape(-1)


def dla_step(q, k, v, g, lam, beta, mask, state: DLAState, *, config, scale):
    """Run a [B, T] block from ``state`` one token at a time; return (o [B, T, H, Dv], final DLAState with
    the bookkeeping on the states' device).

    Padding arrives zeroed (`dla_attention`): g = 0, k = v = 0 and lam = 0 make an identity transition, no
    write and a zero output, and `plan` leaves the bookkeeping alone, so no select is needed."""
    B, T, H, _ = q.shape
    device = state.S.device
    active = torch.ones(B, T, dtype=torch.bool, device=device) if mask is None else mask.to(device)
    if config.policy == "fenwick":  # the one decision that can fail; a host sync for fenwick only
        policy.check_levels(config, int((state.pos.cpu() + active.sum(1).cpu()).max()))
    xp = Torch(device)
    S, n, ibar, pos, opened = state.S.contiguous(), state.n, state.ibar, state.pos, state.opened  # all on device
    outputs = []
    for t in range(T):
        o, S, n, ibar, pos, opened = _step(q[:, t], k[:, t], v[:, t], g[:, t], lam[:, t],
                                           None if beta is None else beta[:, t], active[:, t],
                                           S, n, ibar, pos, opened, config=config, scale=scale, xp=xp)
        outputs.append(o)
    o = torch.stack(outputs, dim=1) if outputs else q.new_zeros(B, 0, H, S.shape[-1], dtype=S.dtype)
    return o, DLAState(S, n, ibar, pos, opened)


def _step(q, k, v, g, lam, beta, active, S, n, ibar, pos, opened, *, config, scale, xp):
    """q, k [B, H, Dk]; v [B, H, Dv]; g [B, H]; beta [B, H] or None (the diagonal transition); lam
    [B, H, L]; active bool [B]; S [B, H, L, Dk, Dv] and the bookkeeping of `DLAState`."""
    L, Dk, Dv = S.shape[2:]
    decay = torch.exp(g)[..., None]  # [B, H, 1]
    b = 1.0 if beta is None else beta[..., None, None]
    reads = torch.stack([q, k], dim=-2)[:, :, None] @ S  # [B, H, L, 2, Dv]: q^T S_i, k^T S_i
    token = b * k[..., :, None] * v[..., None, :]  # [B, H, Dk, Dv]
    with torch.no_grad():
        if config.scored:
            newest = S[:, :, 0] if beta is None else S[:, :, 0] - k[..., :, None] * (b * reads[:, :, 0, 1:])
            newest = decay[..., None] * newest
            terms = [(x * y).sum((-2, -1)) for x, y in ((newest, newest), (token, token), (newest, token))]
            score = policy.score_from_terms(config, *terms, Dk * Dv, xp=xp)
        else:  # no decision reads a score
            score = torch.zeros_like(g)
        plan = policy.plan(config, n, ibar, pos, score, active, xp=xp)
    moved, reads = _move(S, plan.dest, config, decay), _move(reads, plan.dest, config, decay)
    qk = (q * k).sum(-1)[..., None, None]  # [B, H, 1, 1]
    if beta is None:
        q_new = reads[:, :, :, 0]
    else:  # (I - beta k k^T) applied to the moved states (in place, one pass) and to their reads
        k_all = k[:, :, None, :, None].expand(*S.shape[:-1], 1).reshape(-1, Dk, 1)
        moved.view(-1, Dk, Dv).baddbmm_(k_all, (b[..., None] * reads[:, :, :, 1:]).reshape(-1, 1, Dv), alpha=-1)
        q_new = reads[:, :, :, 0] - b * qk * reads[:, :, :, 1]
    moved[:, :, 0] += token
    first = (torch.arange(L, device=S.device) == 0).to(S.dtype)[:, None]  # [L, 1]
    q_new = q_new + first * (b * qk * v[:, :, None])  # q^T (new S_i)  [B, H, L, Dv]
    o = scale * (lam.to(S.dtype)[..., None] * q_new).sum(2)
    return o, moved, plan.n, plan.ibar, plan.pos, opened + (plan.opened & (pos > 0)[:, None])


def _move(x, dest, config, decay):
    """New slot m holds decay times the sum of the old slots j with ``dest[j] == m``. x [B, H, L, ...], dest
    int [B, H, L] (`dla_shared.policy.Plan`), decay [B, H, 1]. A product and a shifted add (``fixed``, ``dla``,
    ``single``: new slot m = old m - 1 and/or old m), or one fold (``fenwick``: levels 0..j into j + 1); so,
    unlike the reference's scatter, a non-finite state spreads NaN to its own cache's other slots."""
    L = dest.shape[-1]
    slots = torch.arange(L, device=x.device)
    mask = lambda m: m.to(x.dtype).view(*m.shape, *[1] * (x.dim() - 3))
    weight = lambda m: decay.view(*decay.shape, *[1] * (x.dim() - 3)) * mask(m)
    if config.policy == "fenwick":  # every slot that moves goes to the same level
        moving = dest != slots
        target = torch.where(moving, dest, -1).amax(-1, keepdim=True)
        return weight(~moving) * x + weight(slots == target) * (mask(moving) * x).sum(2, keepdim=True)
    out = weight(dest == slots) * x
    out[:, :, 1:].addcmul_(weight(dest[..., :-1] == slots[1:]), x[:, :, :-1])
    return out


def dla_cpu(q, k, v, g, lam, beta, mask, state: DLAState, *, config, scale, donate: bool = False):
    """`dla_step`'s computation compiled (`dla_shared.decode`, one token at a time): CPU tensors, no gradient;
    returns (o [B, T, H, Dv], final DLAState in the physical layout). With ``donate`` the states are written
    into ``state.S`` itself where it is C-contiguous (no copy)."""
    if not decode.available():
        raise ValueError("impl='cpu' needs the compiled step (dla_shared._decode), which was not built at install "
                         "(no C compiler); use impl='step'")
    if q.device.type != "cpu":
        raise ValueError(f"impl='cpu' needs CPU tensors, got {q.device}; use impl='step'")
    if needs_grad(q, k, v, g, lam, beta, state.S):
        raise ValueError("impl='cpu' computes no gradients; use impl='step' (or run under torch.no_grad())")
    B, T = q.shape[:2]
    x = lambda t: None if t is None else t.detach().numpy()
    active = np.ones((B, T), bool) if mask is None else x(mask.cpu())
    o, *books = decode.decode(config, scale, *map(x, (q, k, v, g, lam, beta)), active,
                              *(x(getattr(state, f)) for f in DLAState.FIELDS + DLAState.LAYOUT),
                              inplace=donate and state.S.is_contiguous())
    S, n, ibar, pos, opened, slot, decay = map(torch.from_numpy, books)
    return torch.from_numpy(o), DLAState(S, n, ibar, pos, opened, slot=slot, decay=decay)
