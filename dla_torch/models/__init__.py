"""DLA causal language models for PyTorch, in the Hugging Face checkpoint layout, registered with transformers'
AutoConfig and AutoModelForCausalLM (importing dla_torch is enough)."""

from transformers import AutoConfig, AutoModelForCausalLM

from .dla_gated_deltanet import DLAGatedDeltaNetConfig, DLAGatedDeltaNetForCausalLM
from .dla_mamba2 import DLAMamba2Config, DLAMamba2ForCausalLM
from .hub import from_pretrained, save_pretrained

for _config, _model in ((DLAGatedDeltaNetConfig, DLAGatedDeltaNetForCausalLM), (DLAMamba2Config, DLAMamba2ForCausalLM)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForCausalLM.register(_config, _model, exist_ok=True)

__all__ = ["DLAGatedDeltaNetConfig", "DLAGatedDeltaNetForCausalLM", "DLAMamba2Config", "DLAMamba2ForCausalLM",
           "from_pretrained", "save_pretrained"]
