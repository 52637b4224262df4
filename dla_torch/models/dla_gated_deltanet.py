"""DLA Gated DeltaNet: fla's GatedDeltaNet causal LM whose single state becomes DLA's state cache.

Tensor names are fla's (``model.layers.{i}.attn.q_proj.weight`` ...); DLA adds the read-weight projection
``attn.l_proj`` [H * K, hidden], the per-head, per-slot scale ``attn.L`` [H, K] (Log-Linear's layout) and
the thresholds ``attn.tau`` [H] (a buffer, `DLAMixer`).
In DLA's op: q, k are L2-normalized after their short convolutions, scale = head_k_dim^-0.5,
g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b), lam = softplus(L * l) (/ ln 2, `read_weights`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import MLP, CausalLM, DLAMixer, LayerCache, RMSNorm, causal_conv, read_weights
from .configuration import DLAGatedDeltaNetConfig


class GatedDeltaNet(DLAMixer):
    def __init__(self, config: DLAGatedDeltaNetConfig):
        super().__init__(config)
        c = config
        H, K = c.num_heads, c.dla.num_slots
        key_dim, value_dim = H * c.head_dim, H * c.head_v_dim
        self.q_proj = nn.Linear(c.hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, value_dim, bias=False)
        self.a_proj = nn.Linear(c.hidden_size, H, bias=False)
        self.b_proj = nn.Linear(c.hidden_size, H, bias=False)
        self.l_proj = nn.Linear(c.hidden_size, H * K, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16)))
        dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # the inverse of softplus
        self.L = nn.Parameter(torch.ones(H, K))
        self.q_conv1d = nn.Conv1d(key_dim, key_dim, c.conv_size, groups=key_dim, bias=False)
        self.k_conv1d = nn.Conv1d(key_dim, key_dim, c.conv_size, groups=key_dim, bias=False)
        self.v_conv1d = nn.Conv1d(value_dim, value_dim, c.conv_size, groups=value_dim, bias=False)
        self.g_proj = nn.Linear(c.hidden_size, value_dim, bias=False)
        self.o_norm = RMSNorm(c.head_v_dim, c.layer_norm_epsilon)
        self.o_proj = nn.Linear(value_dim, c.hidden_size, bias=False)

    def reset_read_weights(self):
        nn.init.zeros_(self.l_proj.weight)

    def forward(self, x, mask=None, cache: LayerCache | None = None, seq_ids=None, cu_seqlens=None):
        c = self.config
        H, K = c.num_heads, c.dla.num_slots
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
        past = (None, None, None) if cache is None or cache.conv is None else cache.conv
        convs = [causal_conv(proj(x), conv.weight, None, state, seq_ids) for proj, conv, state in
                 zip((self.q_proj, self.k_proj, self.v_proj), (self.q_conv1d, self.k_conv1d, self.v_conv1d), past)]
        q, k, v = (F.silu(y) for y, _ in convs)
        q, k = (_l2norm(t.unflatten(-1, (H, c.head_dim))) for t in (q, k))
        v = v.unflatten(-1, (H, c.head_v_dim))
        g = -torch.exp(self.A_log.float()) * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        beta = torch.sigmoid(self.b_proj(x).float())
        lam = read_weights(self.l_proj(x).unflatten(-1, (H, K)), self.L, c.read_weight_norm)
        o = self.attend(q, k, v, g, lam, beta, cache=cache, scale=c.head_dim**-0.5, mask=mask, cu_seqlens=cu_seqlens)
        if cache is not None:
            cache.conv = tuple(s for _, s in convs)
        gate = self.g_proj(x).unflatten(-1, (H, c.head_v_dim))
        # fla's gated norm: normalize, then gate (Mamba-2's gates first)
        return self.o_proj((self.o_norm(o.to(x.dtype)) * F.silu(gate)).flatten(-2))


class Block(nn.Module):
    def __init__(self, config: DLAGatedDeltaNetConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = GatedDeltaNet(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, **kw):
        x = x + self.attn(self.attn_norm(x), **kw)
        return x + self.mlp(self.mlp_norm(x))


class Body(nn.Module):
    def __init__(self, config: DLAGatedDeltaNetConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)

    def final_norm(self, h):
        return self.norm(h)


class DLAGatedDeltaNetForCausalLM(CausalLM):
    config_class = DLAGatedDeltaNetConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: DLAGatedDeltaNetConfig):
        super().__init__(config)
        self.model = Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def body(self):
        return self.model


def _l2norm(x, eps=1e-6):
    return x * torch.rsqrt((x.float() * x.float()).sum(-1, keepdim=True) + eps).to(x.dtype)
