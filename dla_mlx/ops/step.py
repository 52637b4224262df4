"""Token-by-token DLA in MLX with the decisions on the device: the path `auto` takes to decode off Metal.

The computation of `dla_mlx.ops.reference` (DESIGN section 2), arranged so that a token reads the K states
once and writes them once, with no host round trip:

- q and k are contracted with the old states together (``reads`` [B, H, L, 2, Dv]);
- the score needs only the newest state after its transition; the decisions are `dla_shared.policy.plan`
  in mx ops, from bookkeeping that stays on the device;
- moves commute with the transition, so the states move first, by shifted slices (``fixed``, ``dla``: new
  slot m = old m - 1 and/or old m) or one fold (``fenwick``: levels 0..j into j + 1), and ``reads`` move
  with them;
- the output is assembled from the moved ``reads``, so the new states are written and never read back.

One `mx.compile`d step per (config, scale, transition). Not differentiable in the decisions (as everywhere);
use the reference or the chunk path to train. `dla_cpu` runs the same step compiled in C on the host
(`dla_shared.decode`, not differentiable), the CPU's counterpart of the Metal decode kernel. Shapes as in
`dla_mlx.dla_attention`.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np

from dla_shared import decode, policy
from dla_shared.state import DLAState


def dla_step(q, k, v, g, lam, beta, mask, state: DLAState, *, config, scale):
    """Run a [B, T] block from ``state`` one token at a time; return (o [B, T, H, Dv], final DLAState).

    Padding arrives zeroed (`dla_attention`): g = 0, k = v = 0 and lam = 0 make an identity transition, no
    write and a zero output, and `plan` leaves the bookkeeping alone, so no select is needed."""
    B, T, H, _ = q.shape
    active = mx.ones((B, T), dtype=mx.bool_) if mask is None else mask
    if config.policy == "fenwick":  # the one decision that can fail; a host sync for fenwick only
        policy.check_levels(config, int((state.pos + active.sum(1)).max()))
    step = _compiled(config, float(scale), beta is not None, mx.default_device() == mx.cpu)
    S, n, ibar, pos, opened = state.S, state.n, state.ibar, state.pos, state.opened
    outputs = [mx.zeros((B, 0, H, S.shape[-1]), dtype=S.dtype)]
    for t in range(T):
        o, S, n, ibar, pos, opened = step(q[:, t], k[:, t], v[:, t], g[:, t], lam[:, t],
                                          mx.ones_like(g[:, t]) if beta is None else beta[:, t], active[:, t],
                                          S, n, ibar, pos, opened)
        outputs.append(o[:, None])
    return mx.concatenate(outputs, axis=1), DLAState(S, n, ibar, pos, opened)


class Exact:
    """``mlx.core`` for `dla_shared.policy`, with numpy's float64 comparisons of float32 scores with the thresholds
    and of the pair densities; for the CPU, as MLX's GPU has no float64."""

    def __getattr__(self, name):
        return getattr(mx, name)

    def array(self, x):
        return mx.array(x, dtype=mx.float64)

    def divide(self, x, y):
        return mx.divide(x.astype(mx.float64), y)


@functools.lru_cache(maxsize=None)
def _compiled(config, scale: float, delta: bool, cpu: bool):
    def step(q, k, v, g, lam, beta, active, S, n, ibar, pos, opened):
        """q, k [B, H, Dk]; v [B, H, Dv]; g, beta [B, H] (beta ones for the diagonal transition); lam
        [B, H, L]; active bool [B]; S [B, H, L, Dk, Dv] and the bookkeeping of `DLAState`."""
        L, Dk, Dv = S.shape[2:]
        decay = mx.exp(g)[..., None, None]  # [B, H, 1, 1]
        b = beta[..., None, None]
        reads = mx.stack([q, k], axis=-2)[:, :, None] @ S  # [B, H, L, 2, Dv]: q^T S_i, k^T S_i
        token = b * k[..., :, None] * v[..., None, :]  # [B, H, Dk, Dv]
        xp = Exact() if cpu else mx
        if config.scored:
            newest = S[:, :, 0] - k[..., :, None] * (b * reads[:, :, 0, 1:]) if delta else S[:, :, 0]
            newest = mx.stop_gradient(decay * newest)
            terms = [(x * y).sum((-2, -1)) for x, y in ((newest, newest), (token, token), (newest, token))]
            score = policy.score_from_terms(config, *(mx.stop_gradient(x) for x in terms), Dk * Dv, xp=xp)
        else:  # no decision reads a score
            score = mx.zeros_like(g)
        plan = policy.plan(config, n, ibar, pos, score, active, xp=xp)
        # The K states as [B, H, L, Dk * Dv]: MLX's CPU kernels are much faster with fewer broadcast axes.
        flat = lambda x: x.reshape(*x.shape[:3], Dk * Dv)
        moved, reads = _move(flat(S), plan.dest, config), _move(reads, plan.dest, config)
        first = (mx.arange(L) == 0).astype(S.dtype)[:, None]  # [L, 1]
        qk = (q * k).sum(-1)[..., None, None]  # [B, H, 1, 1]
        if delta:  # (I - beta k k^T) applied to the moved states and to their reads
            moved = moved - flat(k[:, :, None, :, None] * (b[..., None] * reads[:, :, :, 1:]))
            q_reads = reads[:, :, :, 0] - b * qk * reads[:, :, :, 1]
        else:
            q_reads = reads[:, :, :, 0]
        S = (decay * moved + first * flat(token[:, :, None])).reshape(S.shape)
        q_new = decay * q_reads + first * (b * qk * v[:, :, None])  # q^T (new S_i)  [B, H, L, Dv]
        o = scale * (lam.astype(S.dtype)[..., None] * q_new).sum(2)
        return o, S, plan.n, plan.ibar, plan.pos, opened + (plan.opened & (pos > 0)[:, None])

    return mx.compile(step)


def _move(x, dest, config):
    """New slot m holds the sum of the old slots j with ``dest[j] == m``. x [B, H, L, ...], dest int
    [B, H, L] (`dla_shared.policy.Plan`). Products with 0/1 masks and a gather (MLX's CPU selects and
    concatenations cost several of these), so a NaN state spreads to its own cache's other slots."""
    L = dest.shape[-1]
    slots = mx.arange(L)
    mask = lambda m: m.astype(x.dtype).reshape(m.shape + (1,) * (x.ndim - 3))
    if config.policy == "fenwick":  # every slot that moves goes to the same level
        moving = dest != slots
        target = mx.max(mx.where(moving, dest, -1), axis=-1, keepdims=True)
        return mask(~moving) * x + mask(slots == target) * (mask(moving) * x).sum(2, keepdims=True)
    # fixed, dla, single: old slot j goes to j or j + 1
    from_prev = mx.concatenate([mx.zeros_like(dest[..., :1]) != 0, dest[..., :-1] == slots[1:]], axis=-1)
    return mask(from_prev) * x[:, :, mx.maximum(slots - 1, 0)] + mask(dest == slots) * x


def dla_cpu(q, k, v, g, lam, beta, mask, state: DLAState, *, config, scale):
    """`dla_step`'s computation compiled (`dla_shared.decode`, one token at a time, on the host; no gradient):
    returns (o [B, T, H, Dv], final DLAState in the physical layout)."""
    if not decode.available():
        raise ValueError("impl='cpu' needs the compiled step (dla_shared._decode), which was not built at install "
                         "(no C compiler); use impl='step'")
    B, T = q.shape[:2]
    inputs = [a for a in (q, k, v, g, lam, beta, mask) if a is not None]
    mx.eval(*inputs, *(getattr(state, f) for f in state.fields()))  # once, then read through views
    x = lambda a: None if a is None else np.asarray(a)  # a view of MLX's buffer, not a copy
    # A C-contiguous copy (one copy; two for a broadcast or transposed state), which the C step updates in place.
    S = mx.array(np.ascontiguousarray(x(state.S)), dtype=state.S.dtype)  # numpy float64 would become float32
    active = np.ones((B, T), bool) if mask is None else x(mask)
    o, _, *books = decode.decode(config, scale, *map(x, (q, k, v, g, lam, beta)), active, x(S),
                                 *(x(getattr(state, f)) for f in DLAState.FIELDS[1:] + DLAState.LAYOUT), inplace=True)
    # the bookkeeping int64, ibar and decay in the states' dtype (numpy's float64 would come back as float32)
    n, ibar, pos, opened, slot, decay = (mx.array(a, dtype=S.dtype if a.dtype.kind == "f" else mx.int64)
                                         for a in books)
    return mx.array(o, dtype=q.dtype), DLAState(S, n, ibar, pos, opened, slot=slot, decay=decay)
