"""DLA Gated DeltaNet for MLX, in the mlx-lm model contract; the mirror of
`dla_torch.models.dla_gated_deltanet` (same tensor names)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from dla_shared.model_config import DLAGatedDeltaNetConfig

from ..ops import dla_attention
from .base import MLP, CausalLM, DLAMixer, RMSNorm, causal_conv, get_state, read_weights, set_state

ModelArgs = DLAGatedDeltaNetConfig  # mlx-lm's name for the config: the one both backends share


class GatedDeltaNet(DLAMixer):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        a = args
        H, K = a.num_heads, a.dla.num_slots
        key_dim, value_dim = H * a.head_dim, H * a.head_v_dim
        self.q_proj = nn.Linear(a.hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(a.hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(a.hidden_size, value_dim, bias=False)
        self.a_proj = nn.Linear(a.hidden_size, H, bias=False)
        self.b_proj = nn.Linear(a.hidden_size, H, bias=False)
        self.l_proj = nn.Linear(a.hidden_size, H * K, bias=False)
        self.A_log = mx.zeros((H,))
        self.dt_bias = mx.zeros((H,))
        self.L = mx.ones((H, K))
        self.q_conv1d = nn.Conv1d(key_dim, key_dim, a.conv_size, groups=key_dim, bias=False)
        self.k_conv1d = nn.Conv1d(key_dim, key_dim, a.conv_size, groups=key_dim, bias=False)
        self.v_conv1d = nn.Conv1d(value_dim, value_dim, a.conv_size, groups=value_dim, bias=False)
        self.g_proj = nn.Linear(a.hidden_size, value_dim, bias=False)
        self.o_norm = RMSNorm(a.head_v_dim, a.layer_norm_epsilon)
        self.o_proj = nn.Linear(value_dim, a.hidden_size, bias=False)

    def __call__(self, x, mask=None, cache=None):
        a = self.args
        B, T, _ = x.shape
        H, K = a.num_heads, a.dla.num_slots
        if mask is not None:
            x = mx.where(mask[..., None], x, 0)
        lengths = None if cache is None else cache.lengths
        convs = [causal_conv(proj(x), conv.weight, None, None if cache is None else cache[i], lengths)
                 for i, (proj, conv) in enumerate(zip((self.q_proj, self.k_proj, self.v_proj),
                                                      (self.q_conv1d, self.k_conv1d, self.v_conv1d)))]
        q, k, v = (nn.silu(y) for y, _ in convs)
        q, k = (_l2norm(t.reshape(B, T, H, a.head_dim)) for t in (q, k))
        v = v.reshape(B, T, H, a.head_v_dim)
        g = -mx.exp(self.A_log.astype(mx.float32)) * nn.softplus(self.a_proj(x).astype(mx.float32)
                                                                  + self.dt_bias.astype(mx.float32))
        beta = mx.sigmoid(self.b_proj(x).astype(mx.float32))
        lam = read_weights(self.l_proj(x).reshape(B, T, H, K), self.L, a.read_weight_norm)
        config = self.op_config()
        o, state = dla_attention(q, k, v, g, lam, beta, config=config, scale=a.head_dim**-0.5, mask=mask,
                                 initial_state=get_state(cache, 3, config, H), output_final_state=cache is not None,
                                 check_decay=False)
        if cache is not None:
            for i, (_, conv_state) in enumerate(convs):
                cache[i] = conv_state
            set_state(cache, 3, state)
            cache.advance(T)
        gate = self.g_proj(x).reshape(B, T, H, a.head_v_dim)
        # fla's gated norm: normalize, then gate
        return self.o_proj((self.o_norm(o.astype(x.dtype)) * nn.silu(gate)).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn_norm = RMSNorm(args.hidden_size, args.layer_norm_epsilon)
        self.attn = GatedDeltaNet(args)
        self.mlp_norm = RMSNorm(args.hidden_size, args.layer_norm_epsilon)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)

    def __call__(self, x, mask=None, cache=None):
        x = x + self.attn(self.attn_norm(x), mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class Body(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block(args) for _ in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.layer_norm_epsilon)

    def final_norm(self, h):
        return self.norm(h)


class Model(CausalLM):
    conv_states = 3

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Body(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def body(self):
        return self.model


def _l2norm(x, eps=1e-6):
    x32 = x.astype(mx.float32)
    return x * mx.rsqrt((x32 * x32).sum(-1, keepdims=True) + eps).astype(x.dtype)
