"""transformers' configs of the DLA models: thin `PreTrainedConfig`s around the shared definitions
(`dla_shared.model_config`), which validate every field, so validation stays in one place.

The shared config is held as ``spec``; its fields and properties read through the wrapper
(``config.num_heads``, ``config.dla``, ``config.head_v_dim`` ...), and setting a field validates it again.
``to_dict()`` is the shared dict; config.json is that plus transformers' metadata (`METADATA_KEYS`), so
existing folders, the MLX conversion and `dla_shared`'s readers see the format they know.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import transformers
from transformers import PreTrainedConfig

from dla_shared import model_config

# transformers' own config arguments (its dataclass fields and the keywords its loaders pass); every other key
# goes to the shared definition, which refuses unknown ones.
TRANSFORMERS_KEYS = {field.name for field in dataclasses.fields(PreTrainedConfig)} | {
    "name_or_path", "_name_or_path", "_commit_hash", "torch_dtype", "num_labels", "output_attentions",
    "attn_implementation", "experts_implementation", "use_cache", "auto_map"}


class DLAPretrainedConfig(PreTrainedConfig):
    """A transformers config whose model fields are those of ``shared`` (a `dla_shared.model_config` class)."""

    shared: ClassVar[type[model_config.BaseConfig]]

    def __post_init__(self, **kwargs):
        """transformers' ``__init__`` sets its own fields and passes every other keyword here."""
        own = {key: kwargs.pop(key) for key in list(kwargs) if key in TRANSFORMERS_KEYS}
        self.__dict__["spec"] = self.shared.from_dict(kwargs)
        super().__post_init__(**own)

    def __getattr__(self, name):
        spec = self.__dict__.get("spec")
        if spec is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(spec, name)

    def __setattr__(self, name, value):
        spec = self.__dict__.get("spec")
        if spec is not None and name in {field.name for field in dataclasses.fields(spec)}:
            self.__dict__["spec"] = dataclasses.replace(spec, **{name: value})
        else:
            super().__setattr__(name, value)

    def to_dict(self) -> dict:
        return self.spec.to_dict()

    def to_diff_dict(self) -> dict:
        """config.json's content: the shared fields, and transformers' metadata that is set."""
        metadata = {"architectures": self.architectures, "dtype": self.dtype,
                    "transformers_version": transformers.__version__}
        out = {**{k: v for k, v in metadata.items() if v is not None}, **self.to_dict()}
        self.dict_dtype_to_str(out)
        return out


class DLAGatedDeltaNetConfig(DLAPretrainedConfig):
    model_type = "dla_gated_deltanet"
    shared = model_config.DLAGatedDeltaNetConfig


class DLAMamba2Config(DLAPretrainedConfig):
    model_type = "dla_mamba2"
    shared = model_config.DLAMamba2Config
