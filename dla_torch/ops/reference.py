"""The exact PyTorch reference: DESIGN section 2 token by token, vectorized over rows and heads.

Differentiable in q, k, v, g, beta, lam and the initial states; the cache decisions (piecewise constant)
come from `dla_shared.policy` on the host, from the score's three scalars. Shapes as in
`dla_torch.dla_attention`; states are float32 (float64 for float64 inputs) in the layout of `DLAState`.
"""

from __future__ import annotations

import torch

from dla_shared import policy
from dla_shared.state import DLAState


def dla_reference(q, k, v, g, lam, beta, mask, state: DLAState, *, config, scale):
    """Run a [B, T] block from ``state`` (batch B); return (o [B, T, H, Dv], final DLAState)."""
    B, T, H, _ = q.shape
    S, n, ibar, pos, opened = state.S, state.n.numpy(), state.ibar.numpy(), state.pos.numpy(), state.opened.numpy()
    size = S.shape[-1] * S.shape[-2]
    active = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.cpu()
    outputs = []
    for t in range(T):
        S_old = S
        S = torch.exp(g[:, t])[..., None, None, None] * _transition(S, k[:, t], None if beta is None else beta[:, t])
        b_t = 1.0 if beta is None else beta[:, t, :, None, None]
        token = b_t * k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, Dk, Dv]
        with torch.no_grad():
            newest = S[:, :, 0]
            terms = [(newest * newest).sum((-2, -1)), (token * token).sum((-2, -1)), (newest * token).sum((-2, -1))]
            score = policy.score_from_terms(config, *(x.cpu().numpy() for x in terms), size)
        plan = policy.plan(config, n, ibar, pos, score, active[:, t].numpy())
        opened = opened + (plan.opened & (pos > 0)[:, None])  # boundaries: opens after the first token
        n, ibar, pos = plan.n, plan.ibar, plan.pos
        S = _move(S, torch.tensor(plan.dest, device=S.device))
        S = torch.cat([(S[:, :, 0] + token)[:, :, None], S[:, :, 1:]], dim=2)
        on = active[:, t].to(S.device)
        S = torch.where(on[:, None, None, None, None], S, S_old)
        o = scale * torch.einsum("bhl,bhk,bhlkv->bhv", lam[:, t].to(S), q[:, t].to(S), S)
        outputs.append(torch.where(on[:, None, None], o, 0))  # padding may hold NaN
    o = torch.stack(outputs, dim=1) if outputs else q.new_zeros(B, 0, H, S.shape[-1], dtype=S.dtype)
    final = DLAState(S, *(torch.from_numpy(x) for x in (n, ibar, pos, opened)))
    return o, final


def _move(S, dest):
    """Every state to its new slot, states that merge summed: ``new[dest[j]] += S[j]`` per (row, head), O(L)
    states touched (a 0/1 transfer matrix would be O(L^2)). dest int64 [B, H, L] (`dla_shared.policy.Plan`)."""
    return torch.zeros_like(S).scatter_add(2, dest[..., None, None].expand_as(S), S)


def _transition(S, k, beta):
    """(I - beta k k^T) S for every state; S unchanged for the diagonal transition. k [B, H, Dk]."""
    if beta is None:
        return S
    kS = torch.einsum("bhk,bhlkv->bhlv", k, S)
    return S - beta[..., None, None, None] * k[:, :, None, :, None] * kS[:, :, :, None, :]
