"""dla_torch: Dynamic Linear Attention for PyTorch."""

from dla_shared import DLAConfig, DLAState

from . import models  # noqa: F401,I001  (registers the models with transformers' Auto classes)
from .ops import dla_attention, empty_state

__all__ = ["DLAConfig", "DLAState", "dla_attention", "empty_state"]
