"""DLA Mamba-2 for MLX, in the mlx-lm model contract; the mirror of `dla_torch.models.dla_mamba2` (same
tensor names; `sanitize` turns the torch layout of the convolution weights into MLX's)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from dla_shared.model_config import DLAMamba2Config

from ..ops import dla_attention
from .base import MLP, CausalLM, DLAMixer, RMSNorm, causal_conv, get_state, offsets, read_weights, set_state

ModelArgs = DLAMamba2Config  # mlx-lm's name for the config: the one both backends share


class Mixer(DLAMixer):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        a = args
        H, K = a.num_heads, a.dla.num_slots
        self.conv_dim = a.intermediate_size + 2 * a.n_groups * a.state_size
        self.in_proj = nn.Linear(a.hidden_size, a.intermediate_size + self.conv_dim + H + H * K, bias=a.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, a.conv_kernel, groups=self.conv_dim, bias=a.use_conv_bias)
        self.dt_bias = mx.zeros((H,))
        self.A_log = mx.zeros((H,))
        self.D = mx.ones((H,))
        self.L = mx.ones((H, K))
        self.norm = RMSNorm(a.intermediate_size, a.layer_norm_epsilon, a.intermediate_size // a.n_groups)
        self.out_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.use_bias)

    def __call__(self, x, mask=None, cache=None):
        a = self.args
        B, T, _ = x.shape
        H, K, P, N = a.num_heads, a.dla.num_slots, a.head_dim, a.state_size
        if mask is not None:
            x = mx.where(mask[..., None], x, 0)
        z, xBC, dt, dl = mx.split(self.in_proj(x), offsets([a.intermediate_size, self.conv_dim, H, H * K]), axis=-1)
        xBC, conv_state = causal_conv(xBC, self.conv1d.weight, self.conv1d.bias if a.use_conv_bias else None,
                                      None if cache is None else cache[0], None if cache is None else cache.lengths)
        xBC = nn.silu(xBC)
        if mask is not None:
            xBC = mx.where(mask[..., None], xBC, 0)
        xs, Bm, Cm = mx.split(xBC, offsets([a.intermediate_size, a.n_groups * N, a.n_groups * N]), axis=-1)
        dt = mx.clip(nn.softplus(dt.astype(mx.float32) + self.dt_bias.astype(mx.float32)), *a.time_step_limit)
        xs = xs.reshape(B, T, H, P)
        per_group = H // a.n_groups
        k = mx.repeat(Bm.reshape(B, T, a.n_groups, N), per_group, axis=2)
        q = mx.repeat(Cm.reshape(B, T, a.n_groups, N), per_group, axis=2)
        g = -mx.exp(self.A_log.astype(mx.float32)) * dt
        lam = read_weights(dl.reshape(B, T, H, K), self.L, a.read_weight_norm)
        config = self.op_config()
        y, state = dla_attention(q, k, xs * dt[..., None].astype(xs.dtype), g, lam, config=config, mask=mask,
                                 initial_state=get_state(cache, 1, config, H), output_final_state=cache is not None,
                                 check_decay=False)
        if cache is not None:
            cache[0] = conv_state
            set_state(cache, 1, state)
            cache.advance(T)
        y = y.astype(xs.dtype) + self.D.astype(xs.dtype)[:, None] * xs
        return self.out_proj(self.norm(y.reshape(B, T, -1), z))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.residual_in_fp32 = args.residual_in_fp32
        self.norm = RMSNorm(args.hidden_size, args.layer_norm_epsilon)
        self.mixer = Mixer(args)
        if args.mlp_intermediate_size:
            self.mlp_norm = RMSNorm(args.hidden_size, args.layer_norm_epsilon)
            self.mlp = MLP(args.hidden_size, args.mlp_intermediate_size)

    def __call__(self, x, mask=None, cache=None):
        residual = x.astype(mx.float32) if self.residual_in_fp32 else x
        x = residual + self.mixer(self.norm(x), mask, cache)
        return x + self.mlp(self.mlp_norm(x)) if "mlp" in self else x


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block(args) for _ in range(args.num_hidden_layers)]
        self.norm_f = RMSNorm(args.hidden_size, args.layer_norm_epsilon)

    def final_norm(self, h):
        return self.norm_f(h)


class Model(CausalLM):
    conv_states = 1

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.backbone = Backbone(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def body(self):
        return self.backbone
