"""Log-probabilities of target tokens straight from hidden states, and the training objectives.

The LM head of a 150k-token vocabulary turns 8k hidden states into 1.2G logits (5 GB in
fp32); no objective needs them all at once. `token_logprobs` walks the selected positions
in chunks: logits of a chunk, their log-softmax at the target, and (when the head is
frozen) the gradient of that log-probability with respect to the hidden state, which is
a single vector per position. Backward is then one multiply, so the head's matmul runs
twice per token instead of three times, and the full logits tensor never exists.

Objectives (`Objective`) take the final hidden states of a packed micro-batch and return a
summed loss plus the count it is normalised by over the whole optimizer step (loss tokens
for SFT, pairs for preference methods), so gradient accumulation is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from backpropagate.data.dataset import IGNORE_INDEX, Batch
from backpropagate.train.torch.attention import count_equal_rows, packed_kwargs

# Bytes of fp32 logits one chunk may hold; sets the chunk length for a vocabulary.
CHUNK_LOGIT_BYTES = 512 * 2**20


class LMHead(NamedTuple):
    """The output projection as the objectives see it: [V, H] weight and the final logit soft-capping (0 = none)."""

    weight: torch.Tensor
    softcap: float = 0.0


def chunk_length(vocab_size: int) -> int:
    """Positions per chunk so that a chunk's fp32 logits stay near `CHUNK_LOGIT_BYTES`."""
    return max(64, CHUNK_LOGIT_BYTES // (4 * vocab_size) // 64 * 64)


def _logprob_and_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log p(target) per row, and d log p / d logits (= onehot - softmax) in the logits' dtype."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    logp = x.gather(1, targets[:, None]).squeeze(1) - lse.squeeze(1)
    grad = -torch.exp(x - lse)
    grad.scatter_add_(1, targets[:, None], torch.ones_like(lse))
    return logp, grad.to(logits.dtype)


def _logprob_and_grad_eager(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_logprob_and_grad` in half the memory passes, for eager kernels (the CPU).

    One fused fp32 log-softmax, turned into the gradient in place: no fp32 copy of the
    logits and no temporaries (about 2x faster at 512 x 49k logits on two threads). CUDA
    compiles `_logprob_and_grad` instead, whose plain form the compiler fuses.
    """
    logsoftmax = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    logp = logsoftmax.gather(1, targets[:, None]).squeeze(1)
    grad = logsoftmax.exp_().neg_()
    grad.scatter_add_(1, targets[:, None], torch.ones_like(logp[:, None]))
    return logp, grad.to(logits.dtype)


def _logprob_only(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    x = logits.float()
    return x.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(x, dim=-1)


# Replaced by compiled versions on CUDA (see `fused.enable_compiled_kernels`).
KERNELS: dict[str, Callable[..., Any]] = {"logprob_and_grad": _logprob_and_grad_eager, "logprob_only": _logprob_only}


def _soft_capped(logits: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits through `softcap * tanh(logits / softcap)` (Gemma's final soft-capping; 0 = none), and its slope.

    The slope (1 - tanh^2) carries a gradient with respect to the capped logits back to the raw ones.
    """
    if not softcap:
        return logits, None
    t = torch.tanh(logits.float() / softcap)
    return (t * softcap).to(logits.dtype), (1 - t * t).to(logits.dtype)


def _through_cap(dlogits: torch.Tensor, slope: torch.Tensor | None) -> torch.Tensor:
    return dlogits if slope is None else dlogits * slope


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, softcap: float
    ) -> torch.Tensor:
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        head_trains = ctx.needs_input_grad[1]
        # With a frozen head, d logp_i / d h_i is one vector per row: keep it and skip the recompute.
        keep_grad = ctx.needs_input_grad[0] and not head_trains
        grad_hidden = torch.empty_like(hidden) if keep_grad else None
        w = weight.to(hidden.dtype)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            logits, slope = _soft_capped(hidden[s:e] @ w.t(), softcap)
            if grad_hidden is not None:
                out[s:e], dlogits = KERNELS["logprob_and_grad"](logits, targets[s:e])
                del logits
                torch.mm(_through_cap(dlogits, slope), w, out=grad_hidden[s:e])
            else:
                out[s:e] = KERNELS["logprob_only"](logits, targets[s:e])
        ctx.chunk, ctx.softcap = chunk, softcap
        if grad_hidden is not None:
            ctx.save_for_backward(grad_hidden)
            ctx.recompute = False
        else:
            ctx.save_for_backward(hidden, weight, targets)
            ctx.recompute = True
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if not ctx.recompute:
            (grad_hidden,) = ctx.saved_tensors
            return grad_hidden * grad_out[:, None].to(grad_hidden.dtype), None, None, None, None
        hidden, weight, targets = ctx.saved_tensors
        w = weight.to(hidden.dtype)
        d_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        d_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            e = min(hidden.shape[0], s + ctx.chunk)
            logits, slope = _soft_capped(hidden[s:e] @ w.t(), ctx.softcap)
            _, dlogits = KERNELS["logprob_and_grad"](logits, targets[s:e])
            dlogits = _through_cap(dlogits, slope) * grad_out[s:e, None].to(dlogits.dtype)
            if d_hidden is not None:
                torch.mm(dlogits, w, out=d_hidden[s:e])
            if d_weight is not None:
                d_weight.addmm_(dlogits.t().float(), hidden[s:e].float())
        return d_hidden, None if d_weight is None else d_weight.to(weight.dtype), None, None, None


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 0, softcap: float = 0.0
) -> torch.Tensor:
    """Log p(targets[i] | hidden[i]) under the LM head `weight`, without materialising all logits.

    Args:
        hidden: [N, H] final hidden states of the positions that predict something.
        weight: [V, H] LM head weight.
        targets: [N] int64 token ids.
        chunk: Positions per chunk (0 = sized from the vocabulary).
        softcap: Final logit soft-capping (Gemma 3's `final_logit_softcapping`; 0 = none).

    Returns:
        [N] fp32 log-probabilities; differentiable in `hidden` and `weight`.
    """
    chunk = chunk or chunk_length(weight.shape[0])
    out: torch.Tensor = _TokenLogProbs.apply(hidden, weight, targets, chunk, float(softcap))
    return out


def to_device(array: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host array on `device` (pinned and asynchronous on CUDA)."""
    t = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


@dataclass
class DeviceBatch:
    """A `Batch` on the training device, plus host-side indexes of the positions with a target.

    Usually the tokens are the batch's own. A layout may store some tokens once for several
    samples (a preference pair's common prompt): queries then run in stored order with
    `cu_seqlens`, and keys are gathered by `kv_index` into whole samples (`cu_seqlens_k`).

    Attributes:
        batch: The host batch it came from (its samples define `num_samples`).
        input_ids: [1, T] int64 stored tokens.
        position_ids: [1, T] int64.
        cu_seqlens: [m + 1] int32 query segment boundaries.
        max_seqlen: Longest query segment.
        target_positions: [N] positions t whose hidden state predicts a target.
        targets: [N] the target ids.
        target_sample: [N] which sample (0..n-1) each target belongs to.
        cu_seqlens_k: [m + 1] key segment boundaries after `kv_index`, or None (the query ones).
        max_seqlen_k: Longest key segment (0: `max_seqlen`).
        kv_index: [T'] stored position of each key, or None (keys are the stored tokens).
        target_weight: [N] 1 for a target, 0 for padding (None: no padding).
        extra: Objective-specific device tensors (e.g. which samples are chosen).
        equal_rows: n where the row is n samples of one length and nothing else (attention then
            runs them as a batch, `attention.count_equal_rows`), else 0.
    """

    batch: Batch
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    target_positions: torch.Tensor
    targets: torch.Tensor
    target_sample: torch.Tensor
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_k: int = 0
    kv_index: torch.Tensor | None = None
    target_weight: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    equal_rows: int = 0

    @classmethod
    def from_batch(cls, batch: Batch, device: torch.device) -> DeviceBatch:
        """Moves a batch to `device`, computing target positions on the host (no device sync)."""
        labels = batch.labels[0]
        positions = np.flatnonzero(labels[1:] != IGNORE_INDEX)
        sample = np.searchsorted(batch.cu_seqlens[1:], positions + 1, side="right")
        return cls(
            batch=batch,
            input_ids=to_device(batch.input_ids, torch.long, device),
            position_ids=to_device(batch.position_ids, torch.long, device),
            cu_seqlens=to_device(batch.cu_seqlens, torch.int32, device),
            max_seqlen=batch.max_seqlen,
            target_positions=to_device(positions, torch.long, device),
            targets=to_device(labels[1:][positions], torch.long, device),
            target_sample=to_device(sample, torch.long, device),
            equal_rows=count_equal_rows(batch.cu_seqlens, batch.input_ids.shape[1]),
        )

    @property
    def num_samples(self) -> int:
        """Samples in the row."""
        return int(len(self.batch.cu_seqlens) - 1)

    def attention_kwargs(self) -> dict[str, Any]:
        """What the model forward passes down to packed attention for this batch."""
        return packed_kwargs(
            self.cu_seqlens,
            self.max_seqlen,
            self.cu_seqlens_k,
            self.max_seqlen_k or None,
            self.kv_index,
            self.equal_rows,
        )

    def weighted(self, values: torch.Tensor) -> torch.Tensor:
        """Per-target `values` with padded targets zeroed."""
        return values if self.target_weight is None else values * self.target_weight

    def per_sample(self, logp: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([bins] summed per-target values, [bins] target counts), by `target_sample`."""
        counts = torch.ones_like(logp) if self.target_weight is None else self.target_weight
        sums = logp.new_zeros(bins).index_add(0, self.target_sample, self.weighted(logp))
        return sums, logp.new_zeros(bins).index_add(0, self.target_sample, counts)


def target_logprobs(hidden: torch.Tensor, lm_head: LMHead, batch: DeviceBatch) -> torch.Tensor:
    """[N] log-probabilities of every target token of the batch (hidden is [1, T, H])."""
    selected = hidden[0].index_select(0, batch.target_positions)
    return token_logprobs(selected, lm_head.weight, batch.targets, softcap=lm_head.softcap)


def sequence_logprobs(hidden: torch.Tensor, lm_head: LMHead, batch: DeviceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sums of target log-probabilities and target counts (for preference objectives).

    Returns:
        ([n] fp32 summed log-probabilities, [n] fp32 number of target tokens), n = samples in the row.
    """
    return batch.per_sample(target_logprobs(hidden, lm_head, batch), batch.num_samples)


# What a batch contributes to the normalising counts of a step: one count per loss term.
Counts = int | tuple[int, ...]


class Objective(Protocol):
    """A training objective over packed micro-batches (the seam where ORPO/SimPO/KTO plug in).

    `loss_sum` returns unnormalised loss terms (a scalar, or one entry per count of
    `normaliser`); each term is divided by its count summed over the whole optimizer step,
    so accumulating micro-batches gives exactly the step's loss (`normalised_loss`).
    """

    name: str

    def device_batch(self, batch: Batch, device: torch.device) -> DeviceBatch:
        """The batch on `device`, in the layout this objective's forward uses."""
        ...

    def normaliser(self, batch: Batch) -> Counts:
        """What this batch contributes to the step's normalising counts (tokens, pairs, ...)."""
        ...

    def loss_sum(self, hidden: torch.Tensor, lm_head: LMHead, batch: DeviceBatch) -> torch.Tensor:
        """Unnormalised loss term(s) of the batch from final hidden states [1, T, H]."""
        ...


def step_counts(objective: Objective, batches: list[Batch]) -> tuple[int, ...]:
    """Each of the objective's counts summed over the micro-batches (what a process adds to the step's totals)."""
    counts = np.sum([np.atleast_1d(objective.normaliser(b)) for b in batches], axis=0)
    return tuple(int(c) for c in counts)


def step_totals(objective: Objective, batches: list[Batch]) -> tuple[int, ...]:
    """The step's counts: each of the objective's counts summed over the micro-batches (at least 1)."""
    return tuple(max(1, c) for c in step_counts(objective, batches))


def normalised_loss(terms: torch.Tensor, totals: tuple[int, ...] | torch.Tensor) -> torch.Tensor:
    """Sum of each loss term divided by its step count.

    `totals` may be a device tensor (what a replayed CUDA graph reads each step).
    """
    if not isinstance(totals, torch.Tensor):
        totals = torch.tensor(totals, dtype=torch.float32, device=terms.device)
    return (terms.float().reshape(-1) / totals).sum()


class SftObjective:
    """Next-token cross-entropy on the target tokens, averaged over all target tokens of a step."""

    name = "sft"

    def device_batch(self, batch: Batch, device: torch.device) -> DeviceBatch:
        """The batch as it is."""
        return DeviceBatch.from_batch(batch, device)

    def normaliser(self, batch: Batch) -> int:
        """Target tokens of the batch."""
        return batch.num_loss_tokens

    def loss_sum(self, hidden: torch.Tensor, lm_head: LMHead, batch: DeviceBatch) -> torch.Tensor:
        """Summed negative log-likelihood of the targets."""
        return -batch.weighted(target_logprobs(hidden, lm_head, batch)).sum()
