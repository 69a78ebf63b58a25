"""Training rails and what they share.

Each rail (the PyTorch one in `train/torch/`, the MLX one in `train/mlx/`) trains
the same `PreparedDataset` under the same run contract: checkpoints, metrics, resume,
error codes and a PEFT-format adapter folder. What both share lives here (checkpoints,
metrics, interrupts, the thermal guard, the final folder); `backend.py` chooses the rail.
"""
