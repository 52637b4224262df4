"""DLA causal language models for PyTorch, in the Hugging Face checkpoint layout."""

from .dla_gated_deltanet import DLAGatedDeltaNetConfig, DLAGatedDeltaNetForCausalLM
from .dla_mamba2 import DLAMamba2Config, DLAMamba2ForCausalLM
from .hub import from_pretrained, save_pretrained

__all__ = ["DLAGatedDeltaNetConfig", "DLAGatedDeltaNetForCausalLM", "DLAMamba2Config", "DLAMamba2ForCausalLM",
           "from_pretrained", "save_pretrained"]
