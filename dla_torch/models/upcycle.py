"""Upcycling: a pretrained single-state model becomes a DLA model of the same architecture.

Sources: a transformers Mamba-2 (`Mamba2ForCausalLM`, model_type ``mamba2``) becomes ``dla_mamba2``; an fla
Gated DeltaNet (`GatedDeltaNetForCausalLM`, model_type ``gated_deltanet``) becomes ``dla_gated_deltanet``.
Every source tensor keeps its name and value; DLA's read-weight projection (rows ``dl`` appended to Mamba-2's
``in_proj``, GDN's ``l_proj``) starts at zero and ``L`` at one, so with the default ``read_weight_norm`` every
state is read with weight 1 and the upcycled model's logits are the source model's for any policy, before
any training (DESIGN section 2, the invariant). Every layer's thresholds ``tau`` start at the DLA config's.

An fla Log-Linear Mamba-2 (`LogLinearMamba2ForCausalLM`, model_type ``log_linear_mamba2``) already has its
read weights (``dl`` rows, ``L`` with one column per Fenwick level): it loads as ``dla_mamba2`` with its
gated MLP, Log-Linear's plain ``softplus(L * dl)`` read weights, and ``capacity`` = its levels; the
``fenwick`` policy then computes log-linear attention.

    dla-upcycle path/to/mamba2-hf out/dla-mamba2 --policy dla --capacity 30
    dla-upcycle path/to/mamba2-hf out/dla-mamba2 --calibrate-data sample.txt --rate 0.125   # then dla-calibrate
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dla_shared import DLAConfig
from dla_shared.config import mlp_size
from dla_shared.hub import TOKENIZER_FILES, check_output, output_folder, read_config, resolve

from .dla_gated_deltanet import DLAGatedDeltaNetConfig, DLAGatedDeltaNetForCausalLM
from .dla_mamba2 import DLAMamba2Config, DLAMamba2ForCausalLM
from .hub import check_weights, load_weights, save_pretrained, with_thresholds

MAMBA2_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "state_size", "expand", "head_dim",
                 "n_groups", "conv_kernel", "use_bias", "use_conv_bias", "layer_norm_epsilon", "residual_in_fp32",
                 "time_step_limit", "tie_word_embeddings")
GDN_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim", "expand_v", "conv_size",
              "intermediate_size", "tie_word_embeddings")
# fla GatedDeltaNet options DLA's layer implements only at these values.
GDN_REQUIRED = {"use_gate": True, "use_short_conv": True, "allow_neg_eigval": False, "hidden_act": "swish",
                "output_gate_activation": "swish", "hidden_ratio": 4}


def mamba2_config(hf: dict, dla: DLAConfig) -> DLAMamba2Config:
    fields = {name: hf[name] for name in MAMBA2_FIELDS if name in hf}
    if "time_step_limit" in fields:
        fields["time_step_limit"] = _floats(fields["time_step_limit"])
    return DLAMamba2Config(**fields, dla=dla)


def _floats(values):
    """transformers writes inf in config.json as {"__float__": "Infinity"}."""
    return [float(x["__float__"]) if isinstance(x, dict) else x for x in values]


def gated_deltanet_config(fla: dict, dla: DLAConfig) -> DLAGatedDeltaNetConfig:
    for name, value in GDN_REQUIRED.items():
        if fla.get(name, value) != value and not (name == "hidden_ratio" and fla.get("intermediate_size")):
            raise ValueError(f"fla GatedDeltaNet with {name}={fla[name]!r} is not supported (DLA needs {value!r})")
    if fla.get("num_v_heads") not in (None, fla.get("num_heads")):
        raise ValueError(f"fla GatedDeltaNet with num_v_heads={fla['num_v_heads']} != num_heads is not supported")
    fields = {name: fla[name] for name in GDN_FIELDS if fla.get(name) is not None}
    return DLAGatedDeltaNetConfig(**fields, layer_norm_epsilon=fla.get("norm_eps", 1e-6), dla=dla)


def log_linear_mamba2_config(fla: dict, dla: DLAConfig) -> DLAMamba2Config:
    required = {"D_has_hdim": False, "rmsnorm": True, "norm_before_gate": False, "residual_in_fp32": False,
                "hidden_act": "silu", "attnres_block_size": None}
    for name, value in required.items():
        if fla.get(name, value) != value:
            raise ValueError(f"fla LogLinearMamba2 with {name}={fla[name]!r} is not supported (DLA needs {value!r})")
    fields = {name: fla[name] for name in MAMBA2_FIELDS if name in fla}
    return DLAMamba2Config(**fields, layer_norm_epsilon=fla.get("norm_eps", 1e-5), read_weight_norm=False,
                           time_step_limit=_floats(fla.get("dt_limit", (0.0, float("inf")))),
                           mlp_intermediate_size=mlp_size(fla["hidden_size"]), dla=dla)


def with_read_weights(weights: dict, config, prefix: str) -> dict:
    """DLA's names for the source tensors, plus zero read-weight projections and L = 1 in every layer."""
    H, K = config.num_heads, config.dla.num_slots
    out = {}
    for name, tensor in weights.items():
        name = name.replace("backbone.embedding.", "backbone.embeddings.")  # older Mamba-2 checkpoints
        if name.endswith("mixer.in_proj.weight") or name.endswith("mixer.in_proj.bias"):
            tensor = torch.cat([tensor, tensor.new_zeros(H * K, *tensor.shape[1:])])  # the dl rows
        out[name] = tensor
    for i in range(config.num_hidden_layers):
        layer = prefix.format(i=i)
        out[f"{layer}.L"] = torch.ones(H, K)
        if layer.endswith("attn"):
            out[f"{layer}.l_proj.weight"] = torch.zeros(H * K, config.hidden_size)
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def renamed(weights: dict, config, prefix: str) -> dict:
    """fla's Log-Linear Mamba-2 names: ``mixer_norm`` is DLA's block ``norm``; its read weights stay."""
    levels = next(t.shape[1] for name, t in weights.items() if name.endswith("mixer.L"))
    if levels != config.dla.num_slots:
        raise ValueError(f"this Log-Linear Mamba-2 reads {levels} levels per head: use capacity={levels} "
                         f"(got {config.dla.num_slots})")
    return {name.replace(".mixer_norm.", ".norm."): t for name, t in weights.items()}


SOURCES = {  # model_type: (config, DLA model, layer prefix with {i} as the layer, weights)
    "mamba2": (mamba2_config, DLAMamba2ForCausalLM, "backbone.layers.{i}.mixer", with_read_weights),
    "gated_deltanet": (gated_deltanet_config, DLAGatedDeltaNetForCausalLM, "model.layers.{i}.attn", with_read_weights),
    "log_linear_mamba2": (log_linear_mamba2_config, DLAMamba2ForCausalLM, "backbone.layers.{i}.mixer", renamed),
}


def upcycle(path_or_id, dla: DLAConfig, out=None, force: bool = False):
    """Load a Mamba-2 (transformers), Log-Linear Mamba-2 or Gated DeltaNet (fla) folder or Hub id as a DLA
    model, saved to ``out`` if given: a new or empty folder (``force``: replace the model in a non-empty one),
    never the source, written all or nothing (`dla_shared.hub.output_folder`)."""
    folder = resolve(path_or_id)
    if out is not None:
        check_output(out, folder, force)  # before any loading
    source = read_config(folder)
    if source.get("model_type") not in SOURCES:
        raise ValueError(f"expected a Mamba-2, Log-Linear Mamba-2 or Gated DeltaNet checkpoint (model_type one of "
                         f"{sorted(SOURCES)}), "
                         f"got model_type {source.get('model_type')!r}")
    make_config, cls, prefix, convert = SOURCES[source["model_type"]]
    config = make_config(source, dla)
    model = cls(config)
    weights = with_thresholds(model, convert(load_weights(folder), config, prefix))
    check_weights(model, weights)
    model.load_state_dict(weights, strict=False)
    if out is not None:
        has_tokenizer = any((folder / name).exists() for name in TOKENIZER_FILES)
        with output_folder(out, folder, force) as tmp:
            save_pretrained(model, tmp, tokenizer_dir=folder if has_tokenizer else None)
    return model.eval()


def main(argv=None):
    p = argparse.ArgumentParser(prog="dla-upcycle", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a transformers Mamba-2, or fla Log-Linear Mamba-2 or Gated DeltaNet, checkpoint "
                                  "folder or Hub id")
    p.add_argument("out", help="the folder to write the DLA checkpoint into (new or empty, or see --force)")
    p.add_argument("--force", action="store_true", help="replace the model in a non-empty OUT (its old weight "
                   "files and manifest are removed; other files stay)")
    p.add_argument("--policy", default="dla", choices=["single", "fenwick", "fixed", "dla"])
    p.add_argument("--capacity", type=int, default=30)
    p.add_argument("--threshold", type=float, default=0.6)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--calibrate-data", nargs="+", metavar="FILE", help="then set every head's threshold for --rate "
                   "over these .txt / .jsonl files (as dla-calibrate does)")
    p.add_argument("--rate", type=float, help="the target open rate of --calibrate-data, in (0, 1)")
    args = p.parse_args(argv)
    if (args.calibrate_data is None) != (args.rate is None) or args.calibrate_data and args.policy != "dla":
        p.error("--calibrate-data and --rate go together, with --policy dla")
    if args.rate is not None and not 0 < args.rate < 1:
        p.error(f"--rate must be in (0, 1), got {args.rate}")
    missing = [f for f in args.calibrate_data or [] if not Path(f).is_file()]
    if missing:  # before anything is written
        p.error(f"--calibrate-data: no such file: {', '.join(missing)}")
    try:
        dla = DLAConfig(policy=args.policy, capacity=args.capacity, threshold=args.threshold,
                        block_size=args.block_size)
        model = upcycle(args.source, dla, args.out, args.force)
    except (OSError, ValueError) as error:
        p.error(str(error))
    print(f"wrote {args.out}: {model.config.model_type}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, policy {dla.policy}")
    if args.calibrate_data:
        from dla_torch.calibrate import calibrate_folder

        try:
            result = calibrate_folder(args.out, args.calibrate_data, args.rate)
        except (OSError, ValueError) as error:
            p.error(f"--calibrate-data: {error}")
        print(result.table())
        return 1 if result.missed else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
