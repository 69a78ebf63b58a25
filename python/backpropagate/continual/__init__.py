"""Continual training: several runs joined into one LoRA adapter (SLAO, or plain sequential training)."""

from backpropagate.continual.config import MultiRunConfig, multi_run_config
from backpropagate.continual.runner import MultiRunResult, multi_run

__all__ = ["MultiRunConfig", "MultiRunResult", "multi_run", "multi_run_config"]
