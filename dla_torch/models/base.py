"""Building blocks shared by the DLA models: norms, the causal short convolution, read weights, the DLA
mixer's thresholds and op call, and the initialization."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from dla_shared import DLAConfig, DLAState
from dla_torch.ops import dla_attention

INIT_STD = 0.02  # transformers' and fla's initializer_range
# transformers' from_pretrained arguments that change nothing here (the config is the checkpoint's own).
TRANSFORMERS_IGNORED = {"config", "trust_remote_code", "_from_auto", "_from_pipeline"}


class RMSNorm(nn.Module):
    """RMS normalization in float32, optionally gated by silu(gate) first and normalized per group."""

    def __init__(self, size: int, eps: float = 1e-6, group_size: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.group_size = group_size or size

    def forward(self, x, gate=None):
        dtype = x.dtype
        x = x.float()
        if gate is not None:
            x = x * F.silu(gate.float())
        groups = x.unflatten(-1, (-1, self.group_size))
        x = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    """The gated (SwiGLU) MLP of fla's blocks: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def causal_conv(x, weight, bias=None, state=None, seq_ids=None):
    """Depthwise causal convolution over time.

    x [B, T, C]; weight [C, 1, W] (nn.Conv1d's layout); state [B, W - 1, C], the inputs before x (zeros
    if None); seq_ids [B, T] int: taps never reach into another packed sequence. Returns (y [B, T, C],
    new state [B, W - 1, C]).
    """
    B, T, C = x.shape
    W = weight.shape[-1]
    if state is not None and state.shape[0] != B:
        raise ValueError(f"the cache holds {state.shape[0]} sequences but the input has batch size {B}; make a "
                         "cache for this batch (model.make_cache())")
    past = x.new_zeros(B, W - 1, C) if state is None else state.to(x.dtype)
    full = torch.cat([past, x], dim=1)  # [B, W - 1 + T, C]
    y = x.new_zeros(B, T, C) if bias is None else bias.to(x.dtype).expand(B, T, C).clone()
    for j in range(W):  # tap j looks j steps back
        tap = full[:, W - 1 - j : W - 1 - j + T] * weight[:, 0, W - 1 - j].to(x.dtype)
        if seq_ids is not None and j > 0:
            same = torch.zeros_like(seq_ids, dtype=torch.bool)
            same[:, j:] = seq_ids[:, j:] == seq_ids[:, :-j]
            tap = tap * same[..., None]
        y = y + tap
    return y, full[:, T:]


def read_weights(dl, L, normalized: bool):
    """lam = softplus(L * dl) per head and slot (Log-Linear's positive mode), divided by softplus(0) = ln 2
    when ``normalized``, so that a zero projection reads every state with weight 1.
    dl [B, T, H, K] from the layer's projection, L [H, K]."""
    lam = F.softplus(L.float() * dl.float())
    return lam / math.log(2) if normalized else lam


@dataclasses.dataclass
class LayerCache:
    """What one layer carries between calls: its convolutions' past inputs and DLA's state."""

    conv: torch.Tensor | tuple | None = None
    state: DLAState | None = None


class DLAMixer(nn.Module):
    """What every DLA mixer shares: the thresholds of its heads, and the op call that uses them.

    ``tau`` [H] float32 is a buffer: saved, converted and resumed with the weights, never trained (`dla-train`
    moves it toward the target rate). It starts at ``config.dla.thresholds(H)`` and stays float32 when the
    model is cast (in bfloat16 a threshold would round away the controller's small steps).

    In training mode every forward sets ``boundaries = (opened, tokens)``, int64 on the layer's device:
    ``opened`` [H] the tokens of this forward that opened a state, per head, and ``tokens`` [] the tokens
    that could have (not padding, nor a sequence's first token). With a cache that continues sequences, only this
    call's tokens count. Outside training ``boundaries`` keeps its last value (None before any).
    Subclasses define ``reset_read_weights()``: zero the read-weight projection, so that every state is read
    with weight 1 (lam == 1).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.register_buffer("tau", torch.tensor(config.dla.thresholds(config.num_heads), dtype=torch.float32))
        self.boundaries = None

    def op_config(self) -> DLAConfig:
        """The op's config with this layer's thresholds ``tau``; ``tau`` is read again only when it has
        changed, since on CUDA a read waits for the device (a sync per layer and token when decoding)."""
        cached = self.__dict__.get("_op_config")
        if cached is None or cached[0] is not self.tau or cached[1] != self.tau._version:
            config = dataclasses.replace(self.config.dla, threshold=tuple(self.tau.tolist()))
            self.__dict__["_op_config"] = cached = (self.tau, self.tau._version, config)
        return cached[2]

    def attend(self, q, k, v, g, lam, beta=None, *, cache: LayerCache | None, **kw):
        """`dla_attention` with one threshold per head (``tau``), continuing ``cache.state`` and updating it
        when a cache is given; ``kw`` (scale, mask, cu_seqlens) goes to the op. Returns o [B, T, H, Dv]."""
        config = self.op_config()
        initial = None if cache is None else cache.state
        before = (0, 0) if initial is None else boundary_counts(initial)
        o, state = dla_attention(q, k, v, g, lam, beta, config=config, initial_state=initial,
                                 output_final_state=cache is not None or self.training, check_decay=False,
                                 donate_state=cache is not None, **kw)  # the cache owns its state
        if cache is not None:
            cache.state = state
        if self.training:
            self.boundaries = tuple((now - then).to(self.tau.device)
                                    for now, then in zip(boundary_counts(state), before))
        return o

    def _apply(self, fn, recurse=True):
        """``.to(dtype)``, ``.half()`` ... move ``tau`` with the model but leave it float32."""
        tau = self.tau
        super()._apply(fn, recurse)
        if self.tau.dtype != tau.dtype:
            self.tau = tau.to(self.tau.device)
        return self


def boundary_counts(state: DLAState) -> tuple[torch.Tensor, torch.Tensor]:
    """A state's boundaries so far, per head and summed over its sequences, int64 [H]; and its tokens after
    each sequence's first, int64 []."""
    return state.opened.sum(0), (state.pos - 1).clamp(min=0).sum()


def dla_mixers(model: nn.Module) -> list[DLAMixer]:
    """The DLA mixers of a model (or of a wrapper around it: DDP, FSDP, torch.compile), in layer order."""
    return [m for m in model.modules() if isinstance(m, DLAMixer)]


class DLACache(list):
    """What a model carries between calls: one `LayerCache` per layer, updated in place (`CausalLM.make_cache`).
    transformers' ``generate`` passes it from step to step as ``cache``; every layer's state has a fixed
    size (``is_linear``), so it never slices the text by a cache length."""

    is_compileable = False

    @property
    def is_linear(self) -> list[bool]:
        return [True] * len(self)


@dataclasses.dataclass
class CausalLMOutput(ModelOutput):
    """``logits`` [B, T, V] float32; ``cache`` the `DLACache` continued (None without one)."""

    logits: torch.Tensor | None = None
    cache: DLACache | None = None


class CausalLM(PreTrainedModel, GenerationMixin):
    """A transformers causal LM: ``forward(input_ids [B, T], mask=None, cache=None, cu_seqlens=None)
    -> CausalLMOutput`` (``.logits`` [B, T, V] float32).

    ``mask`` [B, T] bool marks real tokens (False = padding), or ``attention_mask`` [B, >= T] (transformers'
    name; its last T columns) does; ``cu_seqlens`` [N + 1] packs N documents in one row (B == 1); ``cache`` is
    `make_cache()`'s `DLACache`, updated in place, to continue the sequences (``use_cache`` makes one).
    Checkpoints are safetensors only (`from_pretrained`). Subclasses set ``body`` (embeddings, layers,
    final_norm) and ``lm_head``.
    """

    body: nn.Module
    lm_head: nn.Linear
    _is_stateful = True  # no assisted generation: a state cannot go back to an earlier token
    _keep_in_fp32_modules_strict = ["tau"]
    activation_checkpointing = False  # in training, recompute each layer in the backward pass

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """Nothing to register: as the config's (`DLAPretrainedConfig.register_for_auto_class`)."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own cache (`make_cache`), not transformers' DynamicCache

    @property
    def layers(self):
        return self.body.layers

    def make_cache(self) -> DLACache:
        return DLACache(LayerCache() for _ in self.layers)

    def get_input_embeddings(self):
        return self.body.embeddings

    @torch.no_grad()
    def init_weights(self, std: float = INIT_STD):
        """transformers' and fla's initialization: every Linear and Embedding weight normal(0, std), biases
        zero (tied embeddings then start as a small output layer that trains). The read-weight projections
        start at zero, so with ``read_weight_norm`` the new model reads every state with weight 1, as
        an upcycled one does. A_log, dt_bias, D, L, norms and convolutions keep the layers' own."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for mixer in dla_mixers(self):
            mixer.reset_read_weights()
        self.tie_weights()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, dtype=None, device_map=None, **kwargs):
        """A checkpoint folder or Hub id (checked against its manifest, `dla_shared.hub.resolve`), read from its
        safetensors only (a pickle file is never opened): the model in eval mode. ``dtype`` (a torch dtype, its
        name, or "auto"/None: as saved) and ``device_map`` (one device) as transformers takes them; its other
        loading options are refused when set (``use_safetensors=False`` too). Through a folder's auto_map
        (``trust_remote_code``) this is the same method."""
        from .hub import load_checkpoint

        refused = sorted(k for k, v in kwargs.items() if k not in TRANSFORMERS_IGNORED and v not in (None, "", "main")
                         and not (k == "use_safetensors" and v is True))
        if args or refused:
            raise ValueError(f"{cls.__name__}.from_pretrained: unsupported argument(s) {refused or list(args)}; "
                             "DLA checkpoints load whole, from safetensors, with dtype and device_map")
        if isinstance(device_map, dict) and set(device_map) == {""}:
            device_map = device_map[""]  # the whole model on one device, as lm-eval's hf model asks for it
        if device_map is not None and not isinstance(device_map, (str, torch.device)):
            raise ValueError(f"device_map must be one device, got {device_map!r}")
        model = load_checkpoint(pretrained_model_name_or_path, cls)
        if dtype not in (None, "auto"):
            model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return model.to(device_map) if device_map is not None else model

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, is_first_iteration=False, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask,
                                                       is_first_iteration=is_first_iteration, **kwargs)
        if inputs.get("cache") is not None and not is_first_iteration:
            inputs.pop("attention_mask", None)  # the state already keeps the padding out; new tokens are real
        return inputs

    def forward(self, input_ids, mask=None, cache=None, cu_seqlens=None, *, attention_mask=None, use_cache=None,
                return_dict=None, **others):
        """``return_dict`` is taken as transformers' generate passes it (the output is always a CausalLMOutput);
        any other argument (``labels``, ``output_attentions=True`` ...) is refused unless it is None or False."""
        unsupported = sorted(name for name, value in others.items() if value is not None and value is not False)
        if unsupported:
            raise TypeError(f"{type(self).__name__}.forward does not take {unsupported}; it takes input_ids, mask "
                            "or attention_mask, cache, cu_seqlens and use_cache, and returns the logits (no loss)")
        if attention_mask is not None:
            if mask is not None:
                raise ValueError("pass mask or attention_mask, not both")
            mask = attention_mask[:, -input_ids.shape[1]:].bool()
        if cache is None and use_cache:
            cache = self.make_cache()
        seq_ids = None
        if cu_seqlens is not None:  # the document of every token, so convolutions stop at document starts
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            seq_ids = (torch.searchsorted(cu_seqlens.to(input_ids.device), positions, right=True) - 1)[None]
        try:
            h = self.body.embeddings(input_ids)
        except IndexError as error:  # the CPU's message names no id (CUDA fails in a device-side assert)
            raise ValueError(f"token ids must be in [0, vocab_size = {self.config.vocab_size}), got ids from "
                             f"{int(input_ids.min())} to {int(input_ids.max())}") from error
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            kw = {"mask": mask, "cache": None if cache is None else cache[i], "seq_ids": seq_ids,
                  "cu_seqlens": cu_seqlens}
            h = checkpoint(layer, h, use_reentrant=False, **kw) if recompute else layer(h, **kw)
        logits = self.lm_head(self.body.final_norm(h).to(self.lm_head.weight.dtype)).float()
        return CausalLMOutput(logits=logits, cache=cache)
