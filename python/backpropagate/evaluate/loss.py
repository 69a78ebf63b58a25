"""Held-out loss and perplexity, through the training data engine and the training loop's own evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backpropagate.config import check_data_kind
from backpropagate.data import DataConfig, prepare
from backpropagate.data.dataset import IGNORE_INDEX
from backpropagate.errors import InputError
from backpropagate.train.torch import loop as torch_loop
from backpropagate.train.torch.loading import TrainingModel
from backpropagate.train.torch.losses import SftObjective

# Packed rows per forward pass.
EVAL_MICRO_BATCH = 4


@dataclass
class HeldOutLoss:
    """Mean next-token loss over the target tokens of a held-out file, and its perplexity."""

    loss: float
    perplexity: float
    tokens: int
    samples: int


def held_out_loss(tm: TrainingModel, data: Path, tokenizer_dir: Path, config: DataConfig) -> HeldOutLoss:
    """Prepares `data` as training would (template, masking, packing) and averages the SFT loss over it.

    Raises:
        InputError: INPUT_FILE_NOT_FOUND for a missing file, the data engine's codes for bad rows,
            INPUT_DATASET_VALIDATION_FAILED for preference or KTO rows (their losses need a method).
    """
    if not data.is_file():
        raise InputError("INPUT_FILE_NOT_FOUND", f"{data}: no such held-out data file")
    dataset = prepare(data, tokenizer_dir, config)
    check_data_kind(dataset.kind, "sft")
    rows = np.arange(dataset.num_rows)
    loss = torch_loop.evaluate(tm, SftObjective(), dataset, rows, EVAL_MICRO_BATCH)
    tokens = int(np.count_nonzero(np.asarray(dataset.labels) != IGNORE_INDEX))
    return HeldOutLoss(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=tokens, samples=dataset.num_samples)
