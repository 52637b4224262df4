"""DLA Mamba-2: the Mamba-2 causal LM whose single state becomes DLA's state cache.

Tensor names are Hugging Face `Mamba2ForCausalLM`'s (``backbone.layers.{i}.mixer.in_proj.weight`` ...), so a
Mamba-2 checkpoint loads by name; DLA adds the read-weight rows ``dl`` at the end of ``in_proj`` and the
per-head, per-slot scale ``L`` [H, K] (Log-Linear Attention's layout) and the thresholds ``tau`` [H] (a
buffer, `DLAMixer`). In DLA's op: q = C, k = B, v = x * dt, g = A * dt, lam = softplus(L * dl) (/ ln 2,
`read_weights`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import MLP, CausalLM, DLAMixer, LayerCache, RMSNorm, causal_conv, read_weights
from .configuration import DLAMamba2Config


class Mixer(DLAMixer):
    def __init__(self, config: DLAMamba2Config):
        super().__init__(config)
        c = config
        H, K = c.num_heads, c.dla.num_slots
        self.conv_dim = c.intermediate_size + 2 * c.n_groups * c.state_size
        self.in_proj = nn.Linear(c.hidden_size, c.intermediate_size + self.conv_dim + H + H * K, bias=c.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, c.conv_kernel, groups=self.conv_dim,
                                padding=c.conv_kernel - 1, bias=c.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        self.L = nn.Parameter(torch.ones(H, K))
        self.norm = RMSNorm(c.intermediate_size, c.layer_norm_epsilon, c.intermediate_size // c.n_groups)
        self.out_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.use_bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """Mamba-2's initialization of A, D and the time step bias."""
        c = self.config
        self.A_log.copy_(torch.log(torch.arange(1, c.num_heads + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand(c.num_heads) * (math.log(c.time_step_max) - math.log(c.time_step_min))
                       + math.log(c.time_step_min)).clamp(min=c.time_step_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # the inverse of softplus

    @torch.no_grad()
    def reset_read_weights(self):
        rows = self.config.num_heads * self.config.dla.num_slots  # dl, the last rows of in_proj
        self.in_proj.weight[-rows:].zero_()
        if self.in_proj.bias is not None:
            self.in_proj.bias[-rows:].zero_()

    def forward(self, x, mask=None, cache: LayerCache | None = None, seq_ids=None, cu_seqlens=None):
        c = self.config
        B, T, _ = x.shape
        H, K, P, N = c.num_heads, c.dla.num_slots, c.head_dim, c.state_size
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
        z, xBC, dt, dl = self.in_proj(x).split([c.intermediate_size, self.conv_dim, H, H * K], dim=-1)
        xBC, conv_state = causal_conv(xBC, self.conv1d.weight, self.conv1d.bias,
                                      None if cache is None else cache.conv, seq_ids)
        xBC = F.silu(xBC)
        if mask is not None:
            xBC = xBC * mask[..., None].to(xBC.dtype)
        xs, Bm, Cm = xBC.split([c.intermediate_size, c.n_groups * N, c.n_groups * N], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*c.time_step_limit)  # [B, T, H]
        xs = xs.unflatten(-1, (H, P))
        per_group = H // c.n_groups
        k = Bm.unflatten(-1, (c.n_groups, N)).repeat_interleave(per_group, dim=2)
        q = Cm.unflatten(-1, (c.n_groups, N)).repeat_interleave(per_group, dim=2)
        g = -torch.exp(self.A_log.float()) * dt
        lam = read_weights(dl.unflatten(-1, (H, K)), self.L, c.read_weight_norm)
        y = self.attend(q, k, xs * dt[..., None].to(xs.dtype), g, lam, cache=cache, mask=mask, cu_seqlens=cu_seqlens)
        if cache is not None:
            cache.conv = conv_state
        y = y.to(xs.dtype) + self.D.to(xs.dtype)[:, None] * xs
        return self.out_proj(self.norm(y.flatten(-2), z))


class Block(nn.Module):
    def __init__(self, config: DLAMamba2Config):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = Mixer(config)
        if config.mlp_intermediate_size:
            self.mlp_norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
            self.mlp = MLP(config.hidden_size, config.mlp_intermediate_size)

    def forward(self, x, **kw):
        residual = x.float() if self.residual_in_fp32 else x
        x = residual + self.mixer(self.norm(x.to(self.norm.weight.dtype)), **kw)
        return x + self.mlp(self.mlp_norm(x)) if hasattr(self, "mlp") else x


class Backbone(nn.Module):
    def __init__(self, config: DLAMamba2Config):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)])
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)

    def final_norm(self, h):
        return self.norm_f(h)


class DLAMamba2ForCausalLM(CausalLM):
    config_class = DLAMamba2Config
    base_model_prefix = "backbone"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: DLAMamba2Config):
        super().__init__(config)
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def body(self):
        return self.backbone
