"""Triton kernels (CUDA; on the CPU under TRITON_INTERPRET=1). Importing this needs triton."""
