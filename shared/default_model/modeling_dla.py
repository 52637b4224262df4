"""The remote code of DLA's torch checkpoint folders: the config's ``save_pretrained`` copies this file into every
folder it writes (as ``modeling_dla.py``) and names its classes in config.json's ``auto_map``, so that transformers'
Auto classes, and the tools built on them (lm-eval's ``hf`` model), load the model with ``trust_remote_code=True``
in a process that has not imported dla_torch. The classes are the installed ``dla`` package's; with dla_torch
imported neither this file nor the flag is needed."""

try:
    from dla_torch.models import (
        DLAGatedDeltaNetConfig,
        DLAGatedDeltaNetForCausalLM,
        DLAMamba2Config,
        DLAMamba2ForCausalLM,
    )
except ImportError as error:
    raise ImportError("this model is a DLA model (Dynamic Linear Attention): install the `dla` package where it is "
                      "loaded (pip install dla)") from error

__all__ = ["DLAGatedDeltaNetConfig", "DLAGatedDeltaNetForCausalLM", "DLAMamba2Config", "DLAMamba2ForCausalLM"]
