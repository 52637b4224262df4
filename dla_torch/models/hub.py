"""Checkpoints in the Hugging Face layout: ``config.json`` plus ``model*.safetensors`` (never pickle),
from a local folder or a Hub id (through huggingface_hub). The models' transformers ``from_pretrained`` and
``save_pretrained`` are these; the functions here are kept as thin layers."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from dla_shared.hub import copy_tokenizer, read_config, resolve


def model_types() -> dict:
    from .dla_gated_deltanet import DLAGatedDeltaNetForCausalLM
    from .dla_mamba2 import DLAMamba2ForCausalLM

    return {"dla_mamba2": DLAMamba2ForCausalLM, "dla_gated_deltanet": DLAGatedDeltaNetForCausalLM}

def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(folder).glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {folder}")
    weights = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                weights[name] = f.get_tensor(name)
    return weights


def with_thresholds(model: torch.nn.Module, weights: dict) -> dict:
    """A checkpoint without thresholds (made before them, or imported) gets every layer's ``tau`` from the
    model, which starts them at its config's threshold; one that has any is left to `check_weights`."""
    if any(name.endswith(".tau") for name in weights):
        return weights
    return {**{name: t for name, t in model.state_dict().items() if name.endswith(".tau")}, **weights}


def check_weights(model: torch.nn.Module, weights: dict) -> None:
    """Raise one clear error listing every missing, unexpected and mis-shaped tensor."""
    expected = {name: p.shape for name, p in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    problems = [f"missing: {name} {list(shape)}" for name, shape in expected.items() if name not in weights]
    problems += [f"unexpected: {name} {list(t.shape)}" for name, t in weights.items() if name not in expected]
    problems += [f"shape of {name}: checkpoint {list(t.shape)}, model {list(expected[name])}"
                 for name, t in weights.items() if name in expected and t.shape != expected[name]]
    if problems:
        raise ValueError("checkpoint does not match the model:\n  " + "\n  ".join(problems))


def load_checkpoint(path_or_id, cls=None):
    """The DLA causal LM of a folder or Hub id (its manifest checked), of class ``cls`` if given (else its
    config's model_type picks it), from its safetensors; in eval mode. Every tensor is checked (`check_weights`)."""
    folder = resolve(path_or_id)
    config = read_config(folder)
    types = model_types()
    model_type = config.get("model_type")
    if model_type not in types:
        raise ValueError(f"unknown model_type {model_type!r} in {folder}/config.json; expected one of {sorted(types)}")
    if cls not in (None, types[model_type]):
        raise ValueError(f"{folder} holds a {model_type} model, not a {cls.config_class.model_type}")
    if "model_file" in config:  # dla-convert names mlx-lm's loader module in the MLX folders it writes
        raise ValueError(f"{folder} is an MLX checkpoint (dla-convert's): load it with dla_mlx, or convert it for "
                         f"torch with `dla-convert {folder} OUT --to torch`")
    cls = types[model_type]
    model = cls(cls.config_class.from_dict(config))
    weights = with_thresholds(model, load_weights(folder))
    check_weights(model, weights)
    model.load_state_dict(weights, strict=False)  # only lm_head.weight may be absent, tied to the embeddings
    return model.eval()


def from_pretrained(path_or_id, dtype=None):
    """Load a DLA causal LM saved by `save_pretrained` (or converted): returns the model in eval mode.
    The same as the model class's (transformers') ``from_pretrained``, the class read from config.json."""
    model = load_checkpoint(path_or_id)
    return model if dtype is None else model.to(dtype)


def save_pretrained(model, folder, tokenizer_dir=None) -> Path:
    """transformers' ``model.save_pretrained`` (config.json, model.safetensors and the remote code its auto_map
    names, modeling_dla.py), and the tokenizer files of ``tokenizer_dir`` copied."""
    folder = Path(folder)
    model.save_pretrained(folder)
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, folder)
    return folder
