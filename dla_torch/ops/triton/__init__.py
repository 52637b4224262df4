"""Triton kernels (CUDA; on the CPU under TRITON_INTERPRET=1) and how they are launched: the mirror of
`dla_mlx.ops.metal`. `chunk` and `scan` import triton; this module does not, so that it imports where
triton is absent (macOS)."""

from __future__ import annotations

import os

import torch

from ..chunk import dla_chunk


def dla_triton(q, *args, **kw):
    """The chunk path with Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1): the decision scan, and
    for float32 the fused chunk forward and backward (other dtypes use the PyTorch chunk math)."""
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU)")
    from . import chunk, scan

    fused = q.dtype == torch.float32
    return dla_chunk(q, *args, decide=scan.triton_scan, fused_forward=chunk.chunk_forward if fused else None,
                     fused_segments=chunk.FusedChunks.apply if fused else None, **kw)
