"""The Metal sources that `dla_mlx.ops.metal` hands to `mx.fast.metal_kernel` (package data only)."""
