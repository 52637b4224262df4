"""Load DLA models with mlx-lm, and convert checkpoints between the PyTorch and MLX layouts.

Both backends use the same tensor names; only the depthwise convolution weights differ in layout (torch
[C, 1, W], MLX [C, W, 1]), so conversion in the same dtype is lossless (bit-exact both ways). Every layer's
thresholds ``tau`` [H] stay float32; a checkpoint without them gets its config's threshold.

    dla-convert out/torch-model out/mlx-model                       # torch -> MLX
    dla-convert out/mlx-model out/torch-again --to torch            # MLX -> torch
    dla-convert out/torch-model out/mlx-4bit --quantize --q-bits 4  # quantized for generation
    dla-convert path/to/mamba2-hf out/mlx-dla --policy dla          # a pretrained Mamba-2, upcycled (needs torch)
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from dla_shared.hub import TOKENIZER_FILES, check_output, copy_tokenizer, output_folder, read_config, resolve

MODEL_TYPES = ("dla_mamba2", "dla_gated_deltanet")
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
# What mx.quantize accepts (affine mode): other values raise, or with group size 0 crash the process.
Q_BITS, Q_GROUP_SIZES = (1, 2, 3, 4, 5, 6, 8), (32, 64, 128)


def register():
    """Let mlx-lm find the DLA model types (``mlx_lm.models.<type>``), no trust_remote_code needed."""
    for name in MODEL_TYPES:
        sys.modules.setdefault(f"mlx_lm.models.{name}", importlib.import_module(f"dla_mlx.models.{name}"))


# Copied into every MLX folder written here and named in its config.json, for mlx-lm's own tools.
MODEL_FILE = "dla_model.py"


def load(path_or_id, **kwargs):
    """`mlx_lm.load` for DLA checkpoints: returns (model, tokenizer). The model comes from the installed
    package (registered with mlx-lm), not from a folder's ``model_file``, so no ``trust_remote_code``: the
    tokenizer is loaded with it False, or transformers would ask whether to run the folder's modeling code (named
    in config.json for its Auto classes) and wait for an answer."""
    from mlx_lm import load as mlx_load
    from transformers.utils import logging

    folder = resolve(path_or_id)
    _check_type(read_config(folder))
    if not any((folder / name).exists() for name in (*TOKENIZER_FILES, "tokenizer.model")):
        raise ValueError(f"{folder} has no tokenizer (tokenizer.json, or another of {list(TOKENIZER_FILES)})")
    register()
    # transformers' AutoTokenizer reads config.json and warns that it does not know the DLA model types.
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        model_config = {**kwargs.pop("model_config", {}), "model_file": None}
        tokenizer_config = {"trust_remote_code": False, **kwargs.pop("tokenizer_config", {})}
        return mlx_load(str(folder), model_config=model_config, tokenizer_config=tokenizer_config, **kwargs)
    finally:
        logging.set_verbosity(verbosity)


def load_model(folder):
    """mlx-lm's ``load_model`` (model, config) for a local DLA folder of either layout, without a tokenizer; the
    model comes from the installed package, as in `load`."""
    from mlx_lm.utils import load_model as mlx_load_model

    register()
    return mlx_load_model(Path(folder), strict=True, model_config={"model_file": None})


def torch_to_mlx(source, out, dtype=None, q_bits=None, q_group_size=64, force=False):
    """A checkpoint in the torch (or already MLX) layout to the MLX layout, cast to ``dtype`` and quantized if
    asked (decay, skip, read-weight parameters and thresholds stay as they are: the model's cast and quant
    predicates). ``out`` is written all or nothing (`dla_shared.hub.output_folder`; ``force``: replace a model
    already there)."""
    from mlx.utils import tree_flatten, tree_map_with_path
    from mlx_lm.utils import quantize_model, save_config, save_model

    if q_bits is not None and (q_bits not in Q_BITS or q_group_size not in Q_GROUP_SIZES):
        raise ValueError(f"quantization: bits must be one of {Q_BITS} and group size one of {Q_GROUP_SIZES}, "
                         f"got bits={q_bits}, group size={q_group_size}")
    register()
    folder = resolve(source)
    _check_type(read_config(folder))
    model, config = load_model(folder)
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        keep = model.cast_predicate
        model.update(tree_map_with_path(lambda p, x: x.astype(DTYPES[dtype]) if keep(p) else x, model.parameters()))
        config["torch_dtype"] = dtype
    if q_bits is not None:
        model, config = quantize_model(model, config, q_group_size, q_bits, quant_predicate=model.quant_predicate)
        if not any(name.endswith(".scales") for name, _ in tree_flatten(model.parameters())):
            raise ValueError(f"quantization: no linear layer's input size is a multiple of the group size "
                             f"{q_group_size}, so nothing would be quantized; choose a smaller group size")
    mx.eval(model.parameters())
    config["model_file"] = MODEL_FILE
    config.pop("auto_map", None)  # the torch folders' remote code (modeling_dla.py) stays with them
    with output_folder(out, folder, force) as tmp:
        save_model(tmp, model)
        save_config(config, tmp / "config.json")
        copy_tokenizer(folder, tmp)
        shutil.copy(Path(__file__).with_name("mlx_lm_model.py"), tmp / MODEL_FILE)
    return dict(tree_flatten(model.parameters()))


def mlx_to_torch(source, out, force=False):
    """A checkpoint in the MLX (or already torch) layout to the torch layout (unquantized models only),
    written all or nothing as `torch_to_mlx` writes; its config.json and remote code as the torch model's
    ``save_pretrained`` writes them (transformers loads it with ``trust_remote_code``)."""
    import torch
    from safetensors.torch import save_file

    from dla_torch.models.hub import model_types

    folder = resolve(source)
    config = read_config(folder)
    _check_type(config)
    if "quantization" in config:
        raise ValueError(f"{folder} is quantized; only unquantized MLX checkpoints convert back to torch")
    weights = {}
    for file in sorted(folder.glob("model*.safetensors")):
        for name, x in mx.load(str(file)).items():
            if "conv1d.weight" in name and x.shape[1] != 1:
                x = x.moveaxis(2, 1)  # MLX [C, W, 1] -> torch [C, 1, W]; a torch-layout source stays
            dtype = getattr(torch, str(x.dtype).split(".")[-1])
            weights[name] = torch.from_numpy(np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x)).to(dtype)
    with output_folder(out, folder, force) as tmp:
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
        config.pop("model_file", None)  # mlx-lm's loader module stays with the MLX folders
        model_types()[config["model_type"]].config_class.from_dict(config).save_pretrained(tmp)
        copy_tokenizer(folder, tmp)


def _check_type(config):
    if config.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {config.get('model_type')!r}; expected one of {list(MODEL_TYPES)} "
                         "(`dla-convert SOURCE OUT` makes a DLA model of a Mamba-2 or Gated DeltaNet checkpoint)")


def main(argv=None):
    p = argparse.ArgumentParser(prog="dla-convert", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a checkpoint folder or Hub id")
    p.add_argument("out", help="the folder to write (new or empty, or see --force)")
    p.add_argument("--force", action="store_true", help="replace the model in a non-empty OUT (its old weight "
                   "files are removed; other files stay)")
    p.add_argument("--to", choices=["mlx", "torch"], default="mlx")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast (MLX side; decay and read weights stay)")
    p.add_argument("--quantize", action="store_true", help="quantize the MLX model's linear layers")
    p.add_argument("--q-bits", type=int, default=4, choices=Q_BITS)
    p.add_argument("--q-group-size", type=int, default=64, choices=Q_GROUP_SIZES)
    p.add_argument("--policy", help="for a Mamba-2 / Gated DeltaNet source: the DLA policy (default dla)")
    p.add_argument("--capacity", type=int, help="for a Mamba-2 / Gated DeltaNet source: K (default 30)")
    args = p.parse_args(argv)
    quantize = args.q_bits if args.quantize else None
    if args.to == "torch" and (args.dtype or args.quantize):
        p.error("--dtype and --quantize apply to the MLX side only")
    try:  # before any loading
        folder = resolve(args.source)
        check_output(args.out, folder, args.force)
        source = read_config(folder)
    except (OSError, ValueError) as e:
        p.error(str(e))
    upcycled = source.get("model_type") not in MODEL_TYPES and args.to == "mlx"
    if not upcycled and (args.policy is not None or args.capacity is not None):
        p.error(f"--policy and --capacity set the policy of a Mamba-2 / Gated DeltaNet source; {args.source} is "
                f"a {source.get('model_type')} checkpoint, whose policy stays (dla-calibrate sets its thresholds)")
    try:
        if args.to == "torch":
            mlx_to_torch(folder, args.out, args.force)
        elif upcycled:  # a pretrained single-state model: upcycle it to DLA in the torch layout first
            from dla_shared import DLAConfig
            from dla_torch.models.upcycle import upcycle

            with tempfile.TemporaryDirectory() as tmp:
                upcycle(folder, DLAConfig(policy=args.policy or "dla",
                                           capacity=30 if args.capacity is None else args.capacity), tmp)
                torch_to_mlx(tmp, args.out, args.dtype, quantize, args.q_group_size, args.force)
        else:
            torch_to_mlx(folder, args.out, args.dtype, quantize, args.q_group_size, args.force)
    except (OSError, ValueError) as e:
        p.error(str(e))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
