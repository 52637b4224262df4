"""Model configurations: dataclasses that round-trip through a Hugging Face style ``config.json``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dla_shared import DLAConfig

# Keys that Hugging Face tools add to config.json; they carry no model structure.
METADATA_KEYS = {"architectures", "torch_dtype", "dtype", "transformers_version", "model_file", "_name_or_path"}


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
        if isinstance(self.dla, dict):
            self.dla = DLAConfig.from_dict(self.dla)
        if not isinstance(self.dla, DLAConfig):
            raise TypeError(f"{type(self).__name__}.dla must be a DLAConfig or a dict, got {type(self.dla).__name__}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["dla"] = self.dla.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - METADATA_KEYS)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, folder):
        Path(folder, "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
