from .attention import dla_attention, empty_state

__all__ = ["dla_attention", "empty_state"]
