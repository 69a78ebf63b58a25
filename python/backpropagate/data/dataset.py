"""The prepared dataset: the one structure handed from the data engine to the trainers.

Everything is flat numpy arrays (the Rust core fills them without copies): token ids and
labels of all samples back to back, offsets that cut them into samples, and a packing
plan that groups samples into rows of at most `max_seq_length` tokens. Batches are cut
from these arrays on demand, so memory stays at one copy of the tokens.

Sample metadata covers the three training kinds:
  * sft: `pair_id` and `kto_label` are -1 everywhere.
  * preference: each pair is two samples (chosen then rejected) with the same `pair_id`,
    `chosen` True for the first; both always sit in the same packed row.
  * kto: `kto_label` is 1 (desirable) or 0 (undesirable).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

IGNORE_INDEX = -100
Kind = Literal["sft", "preference", "kto"]


@dataclass
class Batch:
    """One micro-batch in padding-free form: all samples concatenated into one row.

    Attributes:
        input_ids: int64 [1, T] tokens of every sample back to back.
        labels: int64 [1, T] target ids, IGNORE_INDEX where no loss is taken. Labels are
            *not* shifted (position t predicts labels[t + 1]); each sample's first label is
            IGNORE_INDEX, so no prediction crosses a sample boundary.
        position_ids: int64 [1, T] restarting at 0 for each sample.
        cu_seqlens: int32 [n + 1] cumulative sample boundaries in the row.
        max_seqlen: length of the longest sample.
        sample_index: int64 [n] index of each sample in the dataset.
        num_loss_tokens: labels that carry a loss.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    cu_seqlens: np.ndarray
    max_seqlen: int
    sample_index: np.ndarray
    num_loss_tokens: int

    @property
    def num_tokens(self) -> int:
        """Tokens in the batch (no padding exists in this form)."""
        return int(self.input_ids.shape[1])


@dataclass
class PreparedDataset:
    """Tokenized, masked and packed samples, ready for any backend.

    Attributes:
        kind: "sft", "preference" or "kto".
        input_ids: int32 [N] all samples' tokens back to back.
        labels: int32 [N] target ids or IGNORE_INDEX.
        sample_offsets: int64 [S + 1] sample s is tokens [offsets[s], offsets[s + 1]).
        pack_offsets: int64 [R + 1] packed row r holds pack_samples[pack_offsets[r]:pack_offsets[r + 1]].
        pack_samples: int32 [S] sample indices in row order.
        max_seq_length: the packing budget of one row.
        pair_id: int32 [S] preference pair of each sample, -1 otherwise.
        chosen: bool [S] True for the chosen side of a pair.
        kto_label: int8 [S] 1 desirable, 0 undesirable, -1 otherwise.
        stats: counts of what was read, used and dropped (and why), formats, lengths.
    """

    kind: Kind
    input_ids: np.ndarray
    labels: np.ndarray
    sample_offsets: np.ndarray
    pack_offsets: np.ndarray
    pack_samples: np.ndarray
    max_seq_length: int
    pair_id: np.ndarray
    chosen: np.ndarray
    kto_label: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        """Number of samples (a preference pair counts two)."""
        return int(self.sample_offsets.shape[0] - 1)

    @property
    def num_rows(self) -> int:
        """Number of packed rows."""
        return int(self.pack_offsets.shape[0] - 1)

    @property
    def num_tokens(self) -> int:
        """Tokens over all samples."""
        return int(self.input_ids.shape[0])

    def sample_lengths(self) -> np.ndarray:
        """Token count of each sample."""
        return np.diff(self.sample_offsets)

    def row_samples(self, row: int) -> np.ndarray:
        """Sample indices packed into `row`."""
        return self.pack_samples[self.pack_offsets[row] : self.pack_offsets[row + 1]]

    def batch_of(self, samples: np.ndarray) -> Batch:
        """Concatenates `samples` into one padding-free batch."""
        starts = self.sample_offsets[samples]
        ends = self.sample_offsets[samples + 1]
        lengths = (ends - starts).astype(np.int64)
        index = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends, strict=True)])
        cu = np.zeros(len(samples) + 1, dtype=np.int32)
        np.cumsum(lengths, out=cu[1:])
        position_ids = np.arange(int(cu[-1]), dtype=np.int64) - np.repeat(cu[:-1].astype(np.int64), lengths)
        labels = self.labels[index].astype(np.int64)
        # The first token of a sample is never a target: with the usual one-token shift it
        # would be predicted from the previous sample's last token.
        labels[cu[:-1]] = IGNORE_INDEX
        return Batch(
            input_ids=self.input_ids[index].astype(np.int64)[None, :],
            labels=labels[None, :],
            position_ids=position_ids[None, :],
            cu_seqlens=cu,
            max_seqlen=int(lengths.max()) if len(lengths) else 0,
            sample_index=samples.astype(np.int64),
            num_loss_tokens=int((labels != IGNORE_INDEX).sum()),
        )

    def row_order(self, seed: int, epoch: int) -> np.ndarray:
        """A permutation of packed rows, reproducible from (seed, epoch) alone (so resume can replay it)."""
        rng = np.random.default_rng([seed, epoch])
        return rng.permutation(self.num_rows)

    def batches(self, rows_per_batch: int, seed: int = 0, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        """Micro-batches of `rows_per_batch` packed rows each, in shuffled order.

        Args:
            rows_per_batch: packed rows merged into one padding-free micro-batch.
            seed: shuffling seed.
            epoch: epoch number; each epoch has its own order.
            start: index of the first batch to yield (resume skips what was consumed).
        """
        order = self.row_order(seed, epoch)
        for b in range(start, (len(order) + rows_per_batch - 1) // rows_per_batch):
            rows = order[b * rows_per_batch : (b + 1) * rows_per_batch]
            samples = np.concatenate([self.row_samples(int(r)) for r in rows])
            yield self.batch_of(samples)


def dropped_lines_text(stats: dict[str, Any], file: str, limit: int | None = None) -> str:
    """`reason at file:3, file:8; ...`: where the first dropped rows of each reason are.

    Args:
        stats: Preparation stats with `dropped` (reason -> rows) and `dropped_lines` (reason -> lines).
        file: The dataset file, to name each line as `file:line`.
        limit: Most lines shown per reason (all that the stats kept when None).
    """
    parts = []
    for reason, lines in sorted((stats.get("dropped_lines") or {}).items()):
        shown = lines[:limit]
        more = ", ..." if stats["dropped"].get(reason, 0) > len(shown) else ""
        parts.append(f"{reason} at " + ", ".join(f"{file}:{line}" for line in shown) + more)
    return "; ".join(parts)
