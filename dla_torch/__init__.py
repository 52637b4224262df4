"""dla_torch: Dynamic Linear Attention for PyTorch."""

from dla_shared import DLAConfig, DLAState

from .ops import dla_attention, empty_state

__all__ = ["DLAConfig", "DLAState", "dla_attention", "empty_state"]
