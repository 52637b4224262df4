"""DLA causal LMs for MLX in the mlx-lm model contract (one module per model type)."""
