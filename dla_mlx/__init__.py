"""dla_mlx: Dynamic Linear Attention for MLX."""

from dla_shared import DLAConfig, DLAState

from .convert import load, register
from .ops import dla_attention, empty_state

__all__ = ["DLAConfig", "DLAState", "dla_attention", "empty_state", "load", "register"]
