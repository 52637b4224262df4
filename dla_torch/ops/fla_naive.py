"""fla's readable pure-torch references (``fla/ops/<op>/naive.py``), which the tests use as oracles and the
benchmarks as single-state baselines. Each file is loaded by its path: fla's package ``__init__`` imports its
Triton kernels, which need a GPU stack."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def load(op: str) -> ModuleType:
    """The module ``fla.ops.<op>.naive`` (e.g. ``log_linear_attn``, ``gated_delta_rule``, ``simple_gla``)."""
    spec = importlib.util.find_spec("fla")
    if spec is None:
        raise ModuleNotFoundError("fla (flash-linear-attention) is not installed: pip install flash-linear-attention")
    path = Path(spec.origin).parent / "ops" / op / "naive.py"
    if not path.is_file():
        raise FileNotFoundError(f"op={op!r}: this fla has no {path}")
    module_spec = importlib.util.spec_from_file_location(f"fla_naive_{op}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
