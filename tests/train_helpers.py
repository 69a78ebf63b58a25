"""Prepared datasets built from token ids, for tests of the training loop.

The samples follow a simple rule (each token determines the next), so a model can learn
them and the loss visibly falls; labels mask a prompt-like prefix, as chat data would.
"""

from __future__ import annotations

import numpy as np

from backpropagate.data.dataset import IGNORE_INDEX, PreparedDataset


def pack_first_fit(lengths: np.ndarray, budget: int) -> list[list[int]]:
    """Groups sample indices into rows of at most `budget` tokens (first fit, longest first)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for s in np.argsort(-lengths, kind="stable"):
        for r, free in enumerate(room):
            if lengths[s] <= free:
                rows[r].append(int(s))
                room[r] -= int(lengths[s])
                break
        else:
            rows.append([int(s)])
            room.append(budget - int(lengths[s]))
    return rows


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
    lengths = rng.integers(min_len, max_len + 1, size=samples)
    successor = rng.permutation(vocab)
    ids, labels = [], []
    for n in lengths:
        seq = [int(rng.integers(vocab))]
        for _ in range(n - 1):
            seq.append(int(successor[seq[-1]]))
        lab = list(seq)
        lab[:prompt_len] = [IGNORE_INDEX] * prompt_len
        ids += seq
        labels += lab
    offsets = np.zeros(samples + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    rows = pack_first_fit(lengths, max_seq_length)
    pack_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=pack_offsets[1:])
    return PreparedDataset(
        kind="sft",
        input_ids=np.asarray(ids, dtype=np.int32),
        labels=np.asarray(labels, dtype=np.int32),
        sample_offsets=offsets,
        pack_offsets=pack_offsets,
        pack_samples=np.asarray([s for r in rows for s in r], dtype=np.int32),
        max_seq_length=max_seq_length,
        pair_id=np.full(samples, -1, dtype=np.int32),
        chosen=np.zeros(samples, dtype=bool),
        kto_label=np.full(samples, -1, dtype=np.int8),
    )
