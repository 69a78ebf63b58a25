"""Prepared datasets made directly from token ids, for benchmarks and tests of the loop.

Real runs get their `PreparedDataset` from the data engine (`backpropagate.data.prepare`);
a speed benchmark on random weights needs only token ids of the right lengths, and tests
of the loop need data whose shape they control. Packing here is plain best-fit decreasing.
"""

from __future__ import annotations

import numpy as np

from backpropagate.data.dataset import PreparedDataset


def pack_best_fit(lengths: np.ndarray, budget: int) -> list[list[int]]:
    """Sample indices grouped into rows of at most `budget` tokens (best fit, longest first)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for s in np.argsort(-np.asarray(lengths), kind="stable"):
        size = int(lengths[s])
        fits = [r for r, free in enumerate(room) if size <= free]
        if fits:
            best = min(fits, key=lambda r: room[r])
            rows[best].append(int(s))
            room[best] -= size
        else:
            rows.append([int(s)])
            room.append(budget - size)
    return rows


def dataset_from_samples(ids: list[np.ndarray], labels: list[np.ndarray], max_seq_length: int) -> PreparedDataset:
    """A packed SFT dataset of the given samples (labels unshifted, IGNORE_INDEX where no loss)."""
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    if (lengths > max_seq_length).any():
        raise ValueError(f"a sample is longer than max_seq_length={max_seq_length}")
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    rows = pack_best_fit(lengths, max_seq_length)
    pack_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=pack_offsets[1:])
    n = len(ids)
    return PreparedDataset(
        kind="sft",
        input_ids=np.concatenate(ids).astype(np.int32),
        labels=np.concatenate(labels).astype(np.int32),
        sample_offsets=offsets,
        pack_offsets=pack_offsets,
        pack_samples=np.asarray([s for r in rows for s in r], dtype=np.int32),
        max_seq_length=max_seq_length,
        pair_id=np.full(n, -1, dtype=np.int32),
        chosen=np.zeros(n, dtype=bool),
        kto_label=np.full(n, -1, dtype=np.int8),
    )


def random_dataset(lengths: list[int], vocab_size: int, max_seq_length: int, seed: int = 0) -> PreparedDataset:
    """Uniformly random tokens, every token a target (what speed benchmarks train on)."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, vocab_size, size=n, dtype=np.int64) for n in lengths]
    return dataset_from_samples(ids, ids, max_seq_length)


def realistic_lengths(count: int, max_len: int, seed: int = 0) -> list[int]:
    """Instruction-tuning-like lengths: lognormal around ~350 tokens with a long tail, in [16, max_len]."""
    rng = np.random.default_rng(seed)
    raw = np.exp(rng.normal(5.6, 0.8, size=count))
    return [int(x) for x in np.clip(raw, 16, max_len)]
