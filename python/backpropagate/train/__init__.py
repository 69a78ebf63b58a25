"""Training rails and what they share.

Each rail (the PyTorch one, still in `backends/`, and the MLX one in `train/mlx/`) trains
the same `PreparedDataset` under the same run contract: checkpoints, metrics, resume,
error codes and a PEFT-format adapter folder. What both rails share will live here;
`backend.py` chooses the rail of a run.
"""
