"""Prepared datasets built from token ids, for tests of the training loop.

The samples follow a simple rule (each token determines the next), so a model can learn
them and the loss visibly falls; labels mask a prompt-like prefix, as chat data would.
"""

from __future__ import annotations

import numpy as np

from backpropagate.data.dataset import IGNORE_INDEX, PreparedDataset
from synthetic_data import dataset_from_samples


def rule_dataset(
    vocab: int,
    samples: int,
    min_len: int = 8,
    max_len: int = 40,
    max_seq_length: int = 64,
    seed: int = 0,
    prompt_len: int = 3,
) -> PreparedDataset:
    """Samples whose token t+1 is a fixed function of token t, packed into rows of `max_seq_length`."""
    rng = np.random.default_rng(seed)
    successor = rng.permutation(vocab)
    ids, labels = [], []
    for n in rng.integers(min_len, max_len + 1, size=samples):
        seq = [int(rng.integers(vocab))]
        for _ in range(n - 1):
            seq.append(int(successor[seq[-1]]))
        lab = np.array(seq)
        lab[:prompt_len] = IGNORE_INDEX
        ids.append(np.array(seq))
        labels.append(lab)
    return dataset_from_samples(ids, labels, max_seq_length)
