"""The loss's log-probabilities and their gradient with respect to the logits, by a Triton kernel in two passes.

For a chunk of 832 positions of a 152,064-token vocabulary (bf16 logits), the loss needs
logp = x[target] - logsumexp(x) and the gradient onehot(target) - softmax(x). The least
memory traffic is one read of the logits for the logsumexp, a second read to write the
gradient, and that one write: about 760 MB, 0.27 ms on an H100, where the compiled
`losses._logprob_and_grad` takes about 0.75 ms. Here one program walks one row, first with a
running maximum and sum of exponentials in fp32, then again writing the gradient; without
the gradient (`logprob_only_by_kernel`) the first pass is all.
"""

from __future__ import annotations

import torch

from backpropagate.log import get_logger

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the compiled or plain path is used
    triton = None

# Values of a row each loop step reads: 8 KiB of bf16, 16 per thread at 8 warps, so a thread
# issues two 16-byte loads a step and a program holds few registers, leaving room for several
# programs per multiprocessor (what keeps enough reads in flight for the memory's bandwidth).
# `benches/logprob_gpu.py` times other blocks and warp counts.
BLOCK = 4096
WARPS = 8

log = get_logger("logprob")


if triton is not None:

    @triton.jit
    def _logsumexp(row, cols, BLOCK: tl.constexpr):
        """The log-sum-exp of one row in fp32, from a running maximum and a running sum of exp(x - maximum)."""
        c = tl.arange(0, BLOCK)
        top = float("-inf")
        total = 0.0
        for start in range(0, cols, BLOCK):
            x = tl.load(row + start + c, mask=start + c < cols, other=float("-inf")).to(tl.float32)
            new = tl.maximum(top, tl.max(x, axis=0))
            total = total * tl.exp(top - new) + tl.sum(tl.exp(x - new), axis=0)
            top = new
        return top + tl.log(total)

    @triton.jit
    def _logprob_and_grad_kernel(logits, targets, logp, grad, cols, stride, grad_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        src = logits + row * stride
        lse = _logsumexp(src, cols, BLOCK)
        target = tl.load(targets + row)
        tl.store(logp + row, tl.load(src + target).to(tl.float32) - lse)
        dst = grad + row * grad_stride
        c = tl.arange(0, BLOCK)
        blocks = tl.cdiv(cols, BLOCK)
        for i in range(0, blocks):
            # Backwards: the blocks the first pass read last are the likeliest still in L2.
            at = (blocks - 1 - i) * BLOCK + c
            inside = at < cols
            x = tl.load(src + at, mask=inside, other=0.0).to(tl.float32)
            # onehot - p in fp32, rounded once (not p rounded, then 1 added).
            g = tl.where(at == target, 1.0, 0.0) - tl.exp(x - lse)
            tl.store(dst + at, g.to(grad.dtype.element_ty), mask=inside)

    @triton.jit
    def _logprob_kernel(logits, targets, logp, cols, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        src = logits + row * stride
        lse = _logsumexp(src, cols, BLOCK)
        tl.store(logp + row, tl.load(src + tl.load(targets + row)).to(tl.float32) - lse)


def _rows(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits whose columns are adjacent (the kernel takes a row stride only), targets likewise, and the logp output."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return logits, targets.contiguous(), torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)


def logprob_and_grad_by_kernel(
    logits: torch.Tensor, targets: torch.Tensor, *, block: int = BLOCK, warps: int = WARPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """`losses._logprob_and_grad` for [n, V] logits and [n] targets in [0, V); on the CPU only under `TRITON_INTERPRET=1`.

    `block` and `warps` other than the module's: the bench and the CPU tests.

    Returns:
        ([n] fp32 log p(target), [n, V] onehot(target) - softmax in the logits' dtype).
    """
    logits, targets, logp = _rows(logits, targets)
    rows, cols = logits.shape
    grad = torch.empty((rows, cols), dtype=logits.dtype, device=logits.device)
    if rows:
        _logprob_and_grad_kernel[(rows,)](
            logits, targets, logp, grad, cols, logits.stride(0), grad.stride(0), BLOCK=block, num_warps=warps
        )
    return logp, grad


def logprob_only_by_kernel(
    logits: torch.Tensor, targets: torch.Tensor, *, block: int = BLOCK, warps: int = WARPS
) -> torch.Tensor:
    """`losses._logprob_only` in one pass over the logits (see `logprob_and_grad_by_kernel`)."""
    logits, targets, logp = _rows(logits, targets)
    rows, cols = logits.shape
    if rows:
        _logprob_kernel[(rows,)](logits, targets, logp, cols, logits.stride(0), BLOCK=block, num_warps=warps)
    return logp
