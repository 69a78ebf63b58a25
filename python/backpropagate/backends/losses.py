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
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from backpropagate.data.dataset import IGNORE_INDEX, Batch

# Bytes of fp32 logits one chunk may hold; sets the chunk length for a vocabulary.
CHUNK_LOGIT_BYTES = 512 * 2**20


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


def _logprob_only(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    x = logits.float()
    return x.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(x, dim=-1)


# Replaced by compiled versions on CUDA (see `fused.enable_compiled_kernels`).
KERNELS: dict[str, Callable[..., Any]] = {"logprob_and_grad": _logprob_and_grad, "logprob_only": _logprob_only}


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
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
            logits = hidden[s:e] @ w.t()
            if grad_hidden is not None:
                out[s:e], dlogits = KERNELS["logprob_and_grad"](logits, targets[s:e])
                del logits
                torch.mm(dlogits, w, out=grad_hidden[s:e])
            else:
                out[s:e] = KERNELS["logprob_only"](logits, targets[s:e])
        ctx.chunk = chunk
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
            return grad_hidden * grad_out[:, None].to(grad_hidden.dtype), None, None, None
        hidden, weight, targets = ctx.saved_tensors
        w = weight.to(hidden.dtype)
        d_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        d_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            e = min(hidden.shape[0], s + ctx.chunk)
            _, dlogits = KERNELS["logprob_and_grad"](hidden[s:e] @ w.t(), targets[s:e])
            dlogits = dlogits * grad_out[s:e, None].to(dlogits.dtype)
            if d_hidden is not None:
                torch.mm(dlogits, w, out=d_hidden[s:e])
            if d_weight is not None:
                d_weight.addmm_(dlogits.t().float(), hidden[s:e].float())
        return d_hidden, None if d_weight is None else d_weight.to(weight.dtype), None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """Log p(targets[i] | hidden[i]) under the LM head `weight`, without materialising all logits.

    Args:
        hidden: [N, H] final hidden states of the positions that predict something.
        weight: [V, H] LM head weight.
        targets: [N] int64 token ids.
        chunk: Positions per chunk (0 = sized from the vocabulary).

    Returns:
        [N] fp32 log-probabilities; differentiable in `hidden` and `weight`.
    """
    out: torch.Tensor = _TokenLogProbs.apply(hidden, weight, targets, chunk or chunk_length(weight.shape[0]))
    return out


@dataclass
class DeviceBatch:
    """A `Batch` on the training device, plus host-side indexes of the positions with a target.

    Attributes:
        batch: The host batch it came from.
        input_ids: [1, T] int64.
        position_ids: [1, T] int64.
        cu_seqlens: [n + 1] int32.
        target_positions: [N] positions t whose label[t + 1] is a target.
        targets: [N] the target ids.
        target_sample: [N] which sample (0..n-1) each target belongs to.
    """

    batch: Batch
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    target_positions: torch.Tensor
    targets: torch.Tensor
    target_sample: torch.Tensor

    @classmethod
    def from_batch(cls, batch: Batch, device: torch.device) -> DeviceBatch:
        """Moves a batch to `device`, computing target positions on the host (no device sync)."""
        labels = batch.labels[0]
        positions = np.flatnonzero(labels[1:] != IGNORE_INDEX)
        sample = np.searchsorted(batch.cu_seqlens[1:], positions + 1, side="right")

        def put(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            t = torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
            if device.type == "cuda":
                t = t.pin_memory()
            return t.to(device, non_blocking=True)

        return cls(
            batch=batch,
            input_ids=put(batch.input_ids, torch.long),
            position_ids=put(batch.position_ids, torch.long),
            cu_seqlens=put(batch.cu_seqlens, torch.int32),
            target_positions=put(positions, torch.long),
            targets=put(labels[1:][positions], torch.long),
            target_sample=put(sample, torch.long),
        )

    @property
    def num_samples(self) -> int:
        """Samples in the row."""
        return int(len(self.batch.cu_seqlens) - 1)


def target_logprobs(hidden: torch.Tensor, lm_head: torch.Tensor, batch: DeviceBatch) -> torch.Tensor:
    """[N] log-probabilities of every target token of the batch (hidden is [1, T, H])."""
    selected = hidden[0].index_select(0, batch.target_positions)
    return token_logprobs(selected, lm_head, batch.targets)


def sequence_logprobs(
    hidden: torch.Tensor, lm_head: torch.Tensor, batch: DeviceBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sums of target log-probabilities and target counts (for preference objectives).

    Returns:
        ([n] fp32 summed log-probabilities, [n] fp32 number of target tokens), n = samples in the row.
    """
    logp = target_logprobs(hidden, lm_head, batch)
    sums = torch.zeros(batch.num_samples, dtype=torch.float32, device=logp.device)
    counts = torch.zeros_like(sums)
    sums = sums.index_add(0, batch.target_sample, logp)
    counts = counts.index_add(0, batch.target_sample, torch.ones_like(logp))
    return sums, counts


class Objective(Protocol):
    """A training objective over packed micro-batches (the seam where ORPO/SimPO/KTO plug in)."""

    name: str

    def normaliser(self, batch: Batch) -> int:
        """What this batch contributes to the step's normalising count (tokens, pairs, ...)."""
        ...

    def loss_sum(self, hidden: torch.Tensor, lm_head: torch.Tensor, batch: DeviceBatch) -> torch.Tensor:
        """Unnormalised loss of the batch from final hidden states [1, T, H]."""
        ...


class SftObjective:
    """Next-token cross-entropy on the target tokens, averaged over all target tokens of a step."""

    name = "sft"

    def normaliser(self, batch: Batch) -> int:
        """Target tokens of the batch."""
        return batch.num_loss_tokens

    def loss_sum(self, hidden: torch.Tensor, lm_head: torch.Tensor, batch: DeviceBatch) -> torch.Tensor:
        """Summed negative log-likelihood of the targets."""
        return -target_logprobs(hidden, lm_head, batch).sum()


def objective_for(method: str) -> Objective:
    """The objective of a training method (validated in `TrainConfig.validate`)."""
    if method == "sft":
        return SftObjective()
    from backpropagate.errors import ConfigError

    raise ConfigError("CONFIG_INVALID_SETTING", f"method={method!r} is not available yet")
