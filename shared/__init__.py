"""dla_shared: the backend-neutral DLA spec (config, policies, state object) and the numpy oracle."""

from .config import DLAConfig
from .materialized import materialized_attention
from .oracle import Trace, dla_attention, inspect
from .plot import plot_trace
from .state import DLAState

__all__ = ["DLAConfig", "DLAState", "Trace", "dla_attention", "inspect", "materialized_attention", "plot_trace"]
