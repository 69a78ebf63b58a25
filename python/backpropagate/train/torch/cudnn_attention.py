"""Causal attention on cuDNN's fused kernel for rows of equal samples, where it checks out on the card.

On an H200, cuDNN's attention (through SDPA) ran forward and backward 1.7-1.9x faster than flash attention 2,
the kernel behind `varlen_attn` on torch 2.11 (README, "Attention kernels"). Long-context
rows are one sample each, and at long lengths attention is most of the step. A packed row
whose samples all have one length (fixed-length chunks of text, rows of one sample each)
is a batch of equal rows to SDPA: a view, no copy. SDPA's cuDNN kernel takes no sample
boundaries, so rows of unequal samples stay on `varlen_attn` (which newer torch itself runs
on cuDNN where its build supports that; torch 2.11's cuDNN ops gave wrong results for
packed rows on an H100, cuDNN 9.19).

Not every torch and cuDNN build computes every head layout correctly, so before training
`check` runs the kernel once, forward and backward, on a small row with the model's heads
and compares it with SDPA's math in fp32. A build where it is missing, fails or disagrees
keeps flash attention for the run. Should the kernel fail later, at a length the check did
not try, `give_up` moves the rest of the run to flash attention.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from backpropagate.errors import InputError
from backpropagate.log import get_logger
from backpropagate.memory_estimate import Shape

log = get_logger("attention")

# (device index, query heads, key heads, head dim, dtype) of the layouts `check` verified.
_verified: set[tuple[int, int, int, int, torch.dtype]] = set()
# Largest difference from the fp32 reference, relative to the reference's largest value, that
# a correct kernel stays under with bf16 inputs and outputs (bf16 keeps 8 bits: about 4e-3).
TOLERANCE = 2e-2
CHECK_TOKENS = 300
CHECK_ROWS = 2


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None,
    rows: int = 1,
    backend: SDPBackend = SDPBackend.CUDNN_ATTENTION,
) -> torch.Tensor:
    """Causal attention of `rows` samples of T / rows tokens each, packed in one row, on cuDNN.

    Args:
        query: [1, heads, T, dim].
        key: [1, kv_heads, T, dim] (fewer heads than the query: grouped-query attention).
        value: Like `key`.
        scale: Softmax scale (None: dim ** -0.5).
        rows: Samples in the row, all of T / rows tokens.
        backend: SDPA's backend (another than cuDNN: the tests on the CPU).

    Returns:
        [1, T, heads, dim].
    """

    def batched(x: torch.Tensor) -> torch.Tensor:  # [1, h, rows * L, d] -> [rows, h, L, d], a view
        # squeeze, not [0]: a selection's backward writes the gradient into a zero tensor of the
        # input's shape, laid out head-major, and every later gradient then needs a copy back.
        return x.unflatten(2, (rows, -1)).squeeze(0).transpose(0, 1)

    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(
            batched(query),
            batched(key),
            batched(value),
            is_causal=True,
            scale=scale,
            enable_gqa=query.shape[1] != key.shape[1],
        )
    return out.transpose(1, 2).reshape(1, query.shape[2], query.shape[1], -1)


def give_up(exc: Exception) -> None:
    """After the kernel failed where the check passed (a length it did not try): flash attention from now on.

    Every layer attends over the same lengths, so a failure that depends on them comes at a
    step's first layer, before any layer of that step ran on cuDNN: every recomputation still
    saves what its forward did.
    """
    log.warning("cuDNN attention failed (%s: %s); using flash attention", type(exc).__name__, str(exc)[:200])
    _verified.clear()


def verified(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether `check` passed for this query/key layout ([1, heads, T, dim]) on its CUDA device."""
    if not query.is_cuda:
        return False
    index = query.device.index if query.device.index is not None else torch.cuda.current_device()
    return (index, query.shape[1], key.shape[1], query.shape[-1], query.dtype) in _verified


def _worst_difference(device: torch.device, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> float:
    """Largest relative difference between cuDNN and SDPA's math in fp32, output and gradients.

    Two samples packed in one row, laid out as a model's projections leave them ([1, T, heads,
    dim] seen as [1, heads, T, dim]), so the check covers the batched view training passes.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    tokens = CHECK_ROWS * CHECK_TOKENS

    def leaf(n: int) -> torch.Tensor:
        x = torch.randn(1, tokens, n, head_dim, device=device, generator=generator)
        return x.to(dtype).transpose(1, 2).requires_grad_()

    q, k, v = leaf(heads), leaf(kv_heads), leaf(kv_heads)
    grad = torch.randn(1, tokens, heads, head_dim, device=device, generator=generator)

    def reference() -> torch.Tensor:
        pieces = []
        with sdpa_kernel(SDPBackend.MATH):
            for lo in range(0, tokens, CHECK_TOKENS):
                qs, ks, vs = (t[:, :, lo : lo + CHECK_TOKENS].float() for t in (q, k, v))
                pieces.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True))
        return torch.cat(pieces, dim=2).transpose(1, 2)

    results = []
    for way in (lambda: attend(q, k, v, None, rows=CHECK_ROWS), reference):
        out = way()
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
        results.append([t.detach().float() for t in (out, dq, dk, dv)])
    pairs = zip(*results, strict=True)
    return max(float((got - want).abs().max() / want.abs().max().clamp_min(1e-6)) for got, want in pairs)


@functools.cache
def _check_once(device: torch.device, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> bool:
    try:
        worst = _worst_difference(device, heads, kv_heads, head_dim, dtype)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # a missing backend, an unsupported layout or build: flash attention serves instead
        log.info("cuDNN attention unavailable (%s: %s); using flash attention", type(exc).__name__, str(exc)[:200])
        return False
    if worst > TOLERANCE:
        log.warning("cuDNN attention differs from the reference by %.1e; using flash attention", worst)
        return False
    return True


def check(model: Any, device: torch.device, dtype: torch.dtype) -> bool:
    """Verifies cuDNN attention for `model`'s head layout on `device` (once per layout) and enables it if it passes.

    Only bf16 / fp16 compute on a CUDA card of compute capability 9.0 or newer is tried.
    """
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if torch.cuda.get_device_capability(device)[0] < 9:
        return False
    try:
        shape = Shape.of(model.config)
    except InputError:  # a config without the usual sizes: flash attention, which needs none of them
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    layout = (shape.heads, shape.kv_heads, shape.head_dim, dtype)
    if not _check_once(torch.device("cuda", index), *layout):
        return False
    _verified.add((index, *layout))
    return True
