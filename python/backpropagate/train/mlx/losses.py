"""The MLX twins of the torch rail's objectives (SFT, ORPO, SimPO) and the packed batch layout.

A micro-batch is the torch rail's padding-free `Batch` (all samples of its packed rows
back to back), repacked into lines of one width, `[lines, width]`, several samples to a
line and only the line tails padded. MLX has no variable-length attention, so a line
attends over all its width: the width is chosen per micro-batch to balance tail padding
against masked attention (`line_width`). Attention is masked block-diagonally: a token
attends to the earlier tokens of its own sample only, so packed samples never see each
other. Rotary positions count from the line's start rather than restarting per sample;
attention scores depend only on the distance between a query and a key, which the mask
keeps inside one sample, so the result is that of the restarted positions the torch rail uses.

Each objective returns loss terms that the loop divides by the step's counts, taken from
the torch rail's own objective (`normaliser`), so both rails average over the same tokens
and pairs, and the loss definitions are those of `train/torch/losses.py` and `preference.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from backpropagate.config import TrainConfig
from backpropagate.data.dataset import IGNORE_INDEX, Batch, PreparedDataset
from backpropagate.train.mlx.model import hidden_states, lm_head
from backpropagate.train.torch.losses import Objective
from backpropagate.train.torch.objectives import objective_for
from backpropagate.train.torch.preference import pairs_of, sample_slices


@dataclass
class MlxBatch:
    """A packed micro-batch on the MLX side.

    Attributes:
        batch: The host batch (samples back to back) it was laid out from.
        input_ids: [B, L] tokens, several samples to a line.
        mask: [B, 1, L, L] True where a query may attend a key (same sample, not later).
        target_index: [N] flat index (line x L + column) of each position that predicts a target.
        targets: [N] the target ids.
        target_sample: [N] the sample (0..n-1 in `batch`) of each target; n + s for sample s's prompt targets.
        num_samples: n.
        extra: Objective-specific arrays (which samples are chosen / rejected).
    """

    batch: Batch
    input_ids: mx.array
    mask: mx.array
    target_index: mx.array
    targets: mx.array
    target_sample: mx.array
    num_samples: int
    extra: dict[str, mx.array] = field(default_factory=dict)


LINE_ALIGN = 16  # line widths are multiples of this


def pack_lines(lengths: np.ndarray, width: int) -> list[list[int]]:
    """Samples (by index) packed best-fit decreasing into lines of `width` tokens."""
    lines: list[list[int]] = []
    free: list[int] = []
    for s in np.argsort(-lengths, kind="stable").tolist():
        fits = [i for i, room in enumerate(free) if room >= lengths[s]]
        if fits:
            best = min(fits, key=lambda i: free[i])
            lines[best].append(s)
            free[best] -= int(lengths[s])
        else:
            lines.append([s])
            free.append(width - int(lengths[s]))
    return lines


def line_width(lengths: np.ndarray, attention_share: float) -> int:
    """The line width with the least estimated cost, lines x width x (1 + attention_share x width).

    Candidates start at the longest sample (rounded up to `LINE_ALIGN`) and double until one
    line holds every sample: narrow lines pad their tails, wide lines attend over more masked keys.
    """
    total = int(lengths.sum())
    width = -(-int(lengths.max()) // LINE_ALIGN) * LINE_ALIGN
    best: tuple[float, int] | None = None
    while True:
        cost = len(pack_lines(lengths, width)) * width * (1 + attention_share * width)
        if best is None or cost < best[0]:
            best = (cost, width)
        if width >= total:
            return best[1]
        width *= 2


def layout(batch: Batch, attention_share: float, prompt_of: np.ndarray | None = None) -> MlxBatch:
    """Lays the samples of `batch` out in lines of equal width, several samples to a line.

    Args:
        batch: The micro-batch (its samples back to back).
        attention_share: The model's attention cost per key relative to its per-token weight cost
            (`model.attention_share`), which sets the line width.
        prompt_of: Samples whose every next token (prompt included) is a target too,
            counted under sample n + s (ORPO's prompt loss).
    """
    ids, labels, cu = batch.input_ids[0], batch.labels[0], batch.cu_seqlens
    n = len(cu) - 1
    lengths = np.diff(cu).astype(np.int64)
    width = line_width(lengths, attention_share)
    lines = pack_lines(lengths, width)
    start = np.empty(n, dtype=np.int64)  # flat index of each sample's first token
    for k, members in enumerate(lines):
        column = 0
        for s in members:
            start[s] = k * width + column
            column += int(lengths[s])
    owner = np.repeat(np.arange(n), lengths)
    flat = start[owner] + (np.arange(len(ids)) - cu[:-1][owner])
    grid = np.zeros(len(lines) * width, dtype=np.int32)
    grid[flat] = ids
    segment = np.full(len(lines) * width, -1, dtype=np.int32)
    segment[flat] = owner
    positions = np.flatnonzero(labels[1:] != IGNORE_INDEX)
    targets = labels[1:][positions]
    sample = owner[positions + 1]
    if prompt_of is not None and len(prompt_of):
        spans = sample_slices(batch)
        extra = np.concatenate([np.arange(spans[s].start, spans[s].stop - 1) for s in prompt_of.tolist()])
        extra = extra[labels[extra + 1] == IGNORE_INDEX]
        positions = np.concatenate([positions, extra])
        targets = np.concatenate([targets, ids[extra + 1]])
        sample = np.concatenate([sample, n + owner[extra + 1]])
    seg = mx.array(segment.reshape(len(lines), width))
    causal = mx.tril(mx.ones((width, width), dtype=mx.bool_))
    mask = (seg[:, :, None] == seg[:, None, :]) & causal
    return MlxBatch(
        batch=batch,
        input_ids=mx.array(grid.reshape(len(lines), width)),
        mask=mask[:, None],
        target_index=mx.array(flat[positions].astype(np.int32)),
        targets=mx.array(targets.astype(np.int32)),
        target_sample=mx.array(sample.astype(np.int32)),
        num_samples=n,
    )


def target_logprobs(net: Any, mb: MlxBatch) -> mx.array:
    """[N] fp32 log-probabilities of every target of the micro-batch (logits only at target positions)."""
    hidden = hidden_states(net, mb.input_ids, mb.mask)
    selected = hidden.reshape(-1, hidden.shape[-1])[mb.target_index]
    logits = lm_head(net, selected).astype(mx.float32)
    picked = mx.take_along_axis(logits, mb.targets[:, None], axis=-1).squeeze(-1)
    return picked - mx.logsumexp(logits, axis=-1)


def per_sample(values: mx.array, mb: MlxBatch, bins: int) -> tuple[mx.array, mx.array]:
    """([bins] summed values, [bins] target counts) by `target_sample`."""
    sums = mx.zeros((bins,), dtype=values.dtype).at[mb.target_sample].add(values)
    counts = mx.zeros((bins,), dtype=values.dtype).at[mb.target_sample].add(mx.ones_like(values))
    return sums, counts


def log1mexp(x: mx.array) -> mx.array:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (as `preference.log1mexp`)."""
    return mx.where(x < -0.6931471805599453, mx.log1p(-mx.exp(x)), mx.log(-mx.expm1(x)))


class MlxObjective:
    """SFT, ORPO or SimPO on MLX; the step's counts come from the torch rail's objective (`host`).

    Args:
        config: The run's settings (method and its knobs).
        dataset: The prepared dataset (pair ids for preference methods).
        attention_share: The model's `model.attention_share` (sets the line width of the layout).
    """

    def __init__(self, config: TrainConfig, dataset: PreparedDataset, attention_share: float) -> None:
        self.host: Objective = objective_for(config, dataset)
        self.attention_share = attention_share
        self.name = config.method
        self.dataset = dataset
        self.config = config
        self.prompt_targets = config.method == "orpo" and config.orpo_prompt_loss

    def layout(self, batch: Batch) -> MlxBatch:
        """The micro-batch on the MLX side, with each pair's chosen and rejected sample for preference methods."""
        if self.name == "sft":
            return layout(batch, self.attention_share)
        chosen, rejected = pairs_of(batch, self.dataset)
        mb = layout(batch, self.attention_share, chosen if self.prompt_targets else None)
        mb.extra = {"chosen": mx.array(chosen.astype(np.int32)), "rejected": mx.array(rejected.astype(np.int32))}
        return mb

    def loss_terms(self, net: Any, mb: MlxBatch) -> mx.array:
        """Unnormalised loss terms of the micro-batch (one per count of `host.normaliser`)."""
        logp = target_logprobs(net, mb)
        if self.name == "sft":
            return -logp.sum()[None]
        sums, counts = per_sample(logp, mb, mb.num_samples * (2 if self.prompt_targets else 1))
        chosen, rejected = mb.extra["chosen"], mb.extra["rejected"]
        mean_c = sums[chosen] / mx.maximum(counts[chosen], 1)
        mean_r = sums[rejected] / mx.maximum(counts[rejected], 1)
        nll = -sums[chosen].sum()
        if self.name == "orpo":
            if self.prompt_targets:
                nll = nll - sums[chosen + mb.num_samples].sum()
            log_odds = (mean_c - mean_r) - (log1mexp(mean_c) - log1mexp(mean_r))
            return mx.stack([nll, -self.config.orpo_beta * nn.log_sigmoid(log_odds).sum()])
        simpo = -nn.log_sigmoid(self.config.simpo_beta * (mean_c - mean_r) - self.config.simpo_gamma).sum()
        if not self.config.simpo_alpha:
            return simpo[None]
        return mx.stack([self.config.simpo_alpha * nll, simpo])
