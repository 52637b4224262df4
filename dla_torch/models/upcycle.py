"""Upcycling: a pretrained Mamba-2 checkpoint in the transformers layout (`Mamba2ForCausalLM`'s config.json and
safetensors) becomes a DLA Mamba-2 model.

Every Mamba-2 tensor keeps its name and value; DLA's read-weight rows of ``in_proj`` start at zero and ``L``
at one, so with the default ``read_weight_norm`` every state is read with weight 1 and the upcycled model's
logits are the source model's for any policy, before any training (DESIGN section 2, the invariant).

    dla-upcycle path/to/mamba2-hf out/dla-mamba2 --policy dla --capacity 30
"""

from __future__ import annotations

import argparse

import torch

from dla_shared import DLAConfig

from .dla_mamba2 import DLAMamba2Config, DLAMamba2ForCausalLM
from .hub import TOKENIZER_FILES, check_weights, load_weights, read_config, resolve, save_pretrained

MAMBA2_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "state_size", "expand", "head_dim",
                 "n_groups", "conv_kernel", "use_bias", "use_conv_bias", "layer_norm_epsilon", "residual_in_fp32",
                 "time_step_limit", "tie_word_embeddings")


def mamba2_config(hf: dict, dla: DLAConfig) -> DLAMamba2Config:
    if hf.get("model_type") != "mamba2":
        raise ValueError(f"expected a Mamba-2 checkpoint (model_type 'mamba2'), got model_type {hf.get('model_type')!r}")
    fields = {name: hf[name] for name in MAMBA2_FIELDS if name in hf}
    if "time_step_limit" in fields:  # transformers writes inf as {"__float__": "Infinity"}
        fields["time_step_limit"] = [float(x["__float__"]) if isinstance(x, dict) else x for x in fields["time_step_limit"]]
    return DLAMamba2Config(**fields, dla=dla)


def mamba2_weights(weights: dict, config: DLAMamba2Config) -> dict:
    """Rename to DLA's names and add the read-weight parameters (zero rows in ``in_proj``, ``L`` = 1)."""
    H, K = config.num_heads, config.dla.num_slots
    out = {}
    for name, tensor in weights.items():
        name = name.replace("backbone.embedding.", "backbone.embeddings.")  # older checkpoints
        if name.endswith("mixer.in_proj.weight"):
            tensor = torch.cat([tensor, tensor.new_zeros(H * K, tensor.shape[1])])
        elif name.endswith("mixer.in_proj.bias"):
            tensor = torch.cat([tensor, tensor.new_zeros(H * K)])
        out[name] = tensor
    for i in range(config.num_hidden_layers):
        out[f"backbone.layers.{i}.mixer.L"] = torch.ones(H, K)
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def upcycle_mamba2(path_or_id, dla: DLAConfig, out=None) -> DLAMamba2ForCausalLM:
    """Load a Hugging Face Mamba-2 folder or Hub id as a DLA Mamba-2 model (saved to ``out`` if given)."""
    folder = resolve(path_or_id)
    config = mamba2_config(read_config(folder), dla)
    model = DLAMamba2ForCausalLM(config)
    weights = mamba2_weights(load_weights(folder), config)
    check_weights(model, weights)
    model.load_state_dict(weights, strict=False)
    if out is not None:
        has_tokenizer = any((folder / name).exists() for name in TOKENIZER_FILES)
        save_pretrained(model, out, tokenizer_dir=folder if has_tokenizer else None)
    return model.eval()


def main(argv=None):
    p = argparse.ArgumentParser(prog="dla-upcycle", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a Hugging Face Mamba-2 checkpoint folder or Hub id")
    p.add_argument("out", help="folder for the DLA checkpoint")
    p.add_argument("--policy", default="dla", choices=["single", "fenwick", "fixed", "dla"])
    p.add_argument("--capacity", type=int, default=30)
    p.add_argument("--threshold", type=float, default=0.6)
    p.add_argument("--block-size", type=int, default=64)
    args = p.parse_args(argv)
    dla = DLAConfig(policy=args.policy, capacity=args.capacity, threshold=args.threshold, block_size=args.block_size)
    model = upcycle_mamba2(args.source, dla, args.out)
    print(f"wrote {args.out}: dla_mamba2, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"policy {dla.policy}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
