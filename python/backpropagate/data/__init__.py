"""Data engine: from JSONL to packed, masked token batches (see `dataset.PreparedDataset`)."""

from backpropagate.data.dataset import IGNORE_INDEX, Batch, PreparedDataset

__all__ = ["IGNORE_INDEX", "Batch", "PreparedDataset"]
