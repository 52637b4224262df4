"""The model configurations of both backends: one definition, validated once, that round-trips through a
Hugging Face style ``config.json``. The torch models take them as they are; the MLX models' ``ModelArgs``
are these classes (mlx-lm calls ``from_dict``).

Every field has an exact type: numpy scalars are accepted and converted, strings for numbers or booleans
are refused, unknown keys are refused (but for the metadata that Hugging Face tools and mlx-lm add), and
every default is a valid model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from .config import DLAConfig, mlp_size

# Keys that Hugging Face tools and mlx-lm add to config.json (or, quantize_activations, to the config mlx-lm's
# CLIs load); they carry no model structure.
METADATA_KEYS = {"architectures", "torch_dtype", "dtype", "transformers_version", "model_file", "auto_map",
                 "_name_or_path", "quantization", "quantization_config", "quantize_activations"}
# Fields that are sizes (positive integers) or positive numbers, wherever a class has them.
POSITIVE = {"vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim", "state_size", "expand",
            "n_groups", "conv_kernel", "conv_size", "intermediate_size", "mlp_intermediate_size", "expand_v",
            "layer_norm_epsilon", "time_step_min", "time_step_max", "time_step_floor"}


@dataclasses.dataclass
class BaseConfig:
    """Fields common to the DLA causal LMs; ``dla`` is the cache policy (`DLAConfig` or its dict)."""

    vocab_size: int = 32000
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_heads: int = 12
    dla: DLAConfig = dataclasses.field(default_factory=DLAConfig)
    # Read weights softplus(L * dl) / ln 2 (True) or Log-Linear's plain softplus(L * dl) (False).
    read_weight_norm: bool = True
    tie_word_embeddings: bool = False
    layer_norm_epsilon: float = 1e-5
    model_type: str = ""

    def __post_init__(self):
        name = type(self).__name__
        if isinstance(self.dla, dict):
            self.dla = DLAConfig.from_dict(self.dla)
        if not isinstance(self.dla, DLAConfig):
            raise TypeError(f"{name}.dla must be a DLAConfig or a dict, got {type(self.dla).__name__}")
        for field in dataclasses.fields(self):
            if field.name != "dla":
                value = _exact(name, field.name, str(field.type), getattr(self, field.name))
                if field.name in POSITIVE and value is not None and not value > 0:
                    raise ValueError(f"{name}.{field.name} must be > 0, got {value!r}")
                setattr(self, field.name, value)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["dla"] = self.dla.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - METADATA_KEYS)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, folder):
        Path(folder, "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))


@dataclasses.dataclass
class DLAMamba2Config(BaseConfig):
    num_heads: int = 24  # expand * hidden_size / head_dim
    state_size: int = 128
    expand: int = 2
    head_dim: int = 64
    n_groups: int = 1
    conv_kernel: int = 4
    use_bias: bool = False
    use_conv_bias: bool = True
    residual_in_fp32: bool = True
    time_step_limit: tuple = (0.0, float("inf"))
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    # None: Mamba-2's blocks (mixer only); a width: fla's (Log-Linear) Mamba-2 blocks, mixer then gated MLP.
    mlp_intermediate_size: int | None = None
    model_type: str = "dla_mamba2"

    def __post_init__(self):
        super().__post_init__()
        if len(self.time_step_limit) != 2 or not self.time_step_limit[0] <= self.time_step_limit[1]:
            raise ValueError(f"DLAMamba2Config.time_step_limit must be (low, high) with low <= high, got "
                             f"{self.time_step_limit}")
        if self.expand * self.hidden_size != self.num_heads * self.head_dim:
            raise ValueError(f"DLAMamba2Config: expand * hidden_size ({self.expand * self.hidden_size}) must equal "
                             f"num_heads * head_dim ({self.num_heads * self.head_dim})")
        if self.num_heads % self.n_groups:
            raise ValueError(f"DLAMamba2Config: num_heads ({self.num_heads}) must be divisible by "
                             f"n_groups ({self.n_groups})")

    @property
    def intermediate_size(self) -> int:
        return self.expand * self.hidden_size


@dataclasses.dataclass
class DLAGatedDeltaNetConfig(BaseConfig):
    head_dim: int = 64
    expand_v: float = 2.0
    conv_size: int = 4
    intermediate_size: int | None = None  # the MLP's; None: 4 * hidden * 2 / 3, rounded up to 256
    model_type: str = "dla_gated_deltanet"

    def __post_init__(self):
        super().__post_init__()
        if self.intermediate_size is None:
            self.intermediate_size = mlp_size(self.hidden_size)
        if int(self.head_dim * self.expand_v) != self.head_dim * self.expand_v:
            raise ValueError(f"DLAGatedDeltaNetConfig: head_dim * expand_v must be an integer, got "
                             f"{self.head_dim} * {self.expand_v}")

    @property
    def head_v_dim(self) -> int:
        return int(self.head_dim * self.expand_v)


def _exact(owner: str, name: str, kind: str, value):
    """``value`` as the field's type (``kind``, the annotation's text), numpy scalars converted; else a TypeError."""
    optional = kind.endswith(" | None")
    base = kind.removesuffix(" | None")
    if value is None and optional:
        return value
    is_bool = isinstance(value, (bool, np.bool_))
    if base == "bool" and is_bool:
        return bool(value)
    if base == "int" and isinstance(value, (int, np.integer)) and not is_bool:
        return int(value)
    if base == "float" and isinstance(value, (int, float, np.integer, np.floating)) and not is_bool:
        if math.isfinite(value):
            return float(value)
    if base == "str" and isinstance(value, str):
        return value
    numbers = isinstance(value, (list, tuple)) and all(
        isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_)) for x in value)
    if base == "tuple" and numbers:
        return tuple(float(x) for x in value)
    expected = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string",
                "tuple": "a list of numbers"}[base]
    raise TypeError(f"{owner}.{name} must be {expected}{' or null' if optional else ''}, got {value!r}")
