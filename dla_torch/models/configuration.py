"""transformers' configs of the DLA models: thin `PreTrainedConfig`s around the shared definitions
(`dla_shared.model_config`), which validate every field, so validation stays in one place.

The shared config is held as ``spec``; its fields and properties read through the wrapper
(``config.num_heads``, ``config.dla``, ``config.head_v_dim`` ...), and setting a field validates it again.
``to_dict()`` is the shared dict; config.json is that plus transformers' metadata (`METADATA_KEYS`), so
existing folders, the MLX conversion and `dla_shared`'s readers see the format they know. Its ``auto_map`` names
the classes of `REMOTE_CODE_FILE`, which ``save_pretrained`` writes beside it: transformers loads the folder with
``trust_remote_code=True`` without dla_torch imported first.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import ClassVar

import transformers
from transformers import PreTrainedConfig

from dla_shared import model_config

# transformers' own config arguments (its dataclass fields and the keywords its loaders pass); every other key
# goes to the shared definition, which refuses unknown ones.
TRANSFORMERS_KEYS = {field.name for field in dataclasses.fields(PreTrainedConfig)} | {
    "name_or_path", "_name_or_path", "_commit_hash", "torch_dtype", "num_labels", "output_attentions",
    "attn_implementation", "experts_implementation", "use_cache"}
# dla_torch/models/remote_code.py, which imports the installed package's classes, and its name in a folder.
REMOTE_CODE = Path(__file__).with_name("remote_code.py")
REMOTE_CODE_FILE = "modeling_dla.py"


class DLAPretrainedConfig(PreTrainedConfig):
    """A transformers config whose model fields are those of ``shared`` (a `dla_shared.model_config` class)."""

    shared: ClassVar[type[model_config.BaseConfig]]
    causal_lm: ClassVar[str]  # the name of the model's class, for auto_map

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

    @property
    def auto_map(self) -> dict:
        """The classes transformers imports from the folder (`REMOTE_CODE_FILE`) with ``trust_remote_code``; the
        same for every folder of a model type (a folder's own is read as metadata and not kept)."""
        module = Path(REMOTE_CODE_FILE).stem
        return {"AutoConfig": f"{module}.{type(self).__name__}", "AutoModelForCausalLM": f"{module}.{self.causal_lm}"}

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig"):
        """Nothing to register. transformers calls this on a class it loaded through an auto_map, so that saving
        copies the class's source files; `save_pretrained` writes `REMOTE_CODE` instead."""

    def save_pretrained(self, save_directory, push_to_hub=False, **kwargs):
        """transformers' (config.json), with `REMOTE_CODE_FILE`, which its auto_map names, beside it."""
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        shutil.copy(REMOTE_CODE, Path(save_directory, REMOTE_CODE_FILE))
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def to_dict(self) -> dict:
        return self.spec.to_dict()

    def to_diff_dict(self) -> dict:
        """config.json's content: the shared fields, and transformers' metadata that is set."""
        metadata = {"architectures": self.architectures, "auto_map": self.auto_map, "dtype": self.dtype,
                    "transformers_version": transformers.__version__}
        out = {**{k: v for k, v in metadata.items() if v is not None}, **self.to_dict()}
        self.dict_dtype_to_str(out)
        return out


class DLAGatedDeltaNetConfig(DLAPretrainedConfig):
    model_type = "dla_gated_deltanet"
    shared = model_config.DLAGatedDeltaNetConfig
    causal_lm = "DLAGatedDeltaNetForCausalLM"


class DLAMamba2Config(DLAPretrainedConfig):
    model_type = "dla_mamba2"
    shared = model_config.DLAMamba2Config
    causal_lm = "DLAMamba2ForCausalLM"
