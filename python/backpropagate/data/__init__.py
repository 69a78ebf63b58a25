"""Data engine: from JSONL to packed, masked token batches (see `dataset.PreparedDataset`)."""

from backpropagate.data.config import DataConfig
from backpropagate.data.dataset import IGNORE_INDEX, Batch, PreparedDataset
from backpropagate.data.prepare import prepare

__all__ = ["IGNORE_INDEX", "Batch", "DataConfig", "PreparedDataset", "prepare"]
