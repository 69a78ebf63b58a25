"""Packed causal attention on cuDNN's fused kernel, for models where it checks out on the card.

On Hopper, cuDNN's attention trains (forward and backward) faster than flash attention 2,
the kernel behind `varlen_attn` on older torch (README, "Attention kernels"). It takes a
packed row's sample boundaries directly as ragged offsets, so it serves every packed batch,
CUDA graphs included, as long as queries and keys share their boundaries and no sliding
window applies.

Its entry points are torch's private ops (`aten._cudnn_attention_forward` / `_backward`,
which SDPA and newer torch's `varlen_attn` call), and not every torch and cuDNN build pairs
them correctly for ragged rows. So before training, `check` runs them once on a small packed
row with the model's head layout, samples of several lengths and the empty samples that
CUDA graphs pad with, and compares output and gradients with per-sample SDPA in fp32. A
build where the ops are missing, fail or disagree keeps flash attention for the run; the
check never switches kernels mid-run, where a recomputed layer must save what its forward did.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# (device index, query heads, key heads, head dim, dtype) of the layouts `check` verified.
_verified: set[tuple[int, int, int, int, torch.dtype]] = set()
# Largest difference from the fp32 reference, relative to the reference's largest value, that
# a correct kernel stays under with bf16 inputs and outputs (bf16 keeps 8 bits: about 4e-3).
TOLERANCE = 2e-2
# The check's row: samples of several lengths, then the empty samples graphs pad with.
CHECK_LENGTHS = (37, 128, 1, 300, 70)
CHECK_EMPTY = 3


class _RaggedCausal(torch.autograd.Function):
    """cuDNN attention over a packed row: [T, heads, dim] in, [T, heads, dim] out."""

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float | None
    ) -> torch.Tensor:
        result = torch.ops.aten._cudnn_attention_forward(
            q, k, v, None, cu, cu, max_len, max_len, True, 0.0, True, False, scale=scale
        )
        out, lse, seed, offset = result[0], result[1], result[6], result[7]
        ctx.save_for_backward(q, k, v, out, lse, seed, offset, cu)
        ctx.max_len, ctx.scale = max_len, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse, seed, offset, cu = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._cudnn_attention_backward(
            grad.contiguous(), q, k, v, out, lse, seed, offset, None, cu, cu,
            ctx.max_len, ctx.max_len, 0.0, True, scale=ctx.scale,
        )  # fmt: skip
        return dq, dk, dv, None, None, None


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float | None
) -> torch.Tensor:
    """Causal attention within each sample of a packed row ([T, heads, dim], contiguous; keys may be fewer heads)."""
    out = _RaggedCausal.apply(q, k, v, cu, max_len, scale)
    assert isinstance(out, torch.Tensor)
    return out


def verified(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether `check` passed for this query/key layout ([1, heads, T, dim]) on its device."""
    index = query.device.index if query.device.index is not None else torch.cuda.current_device()
    return (index, query.shape[1], key.shape[1], query.shape[-1], query.dtype) in _verified


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Per-sample causal SDPA in fp32: [T, heads, dim]."""
    outs = []
    for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True):
        if len(qs):
            a, b, c = (t.float().transpose(0, 1) for t in (qs, ks, vs))
            outs.append(F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True).transpose(0, 1))
    return torch.cat(outs)


def _worst_difference(device: torch.device, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> float:
    """Largest relative difference between cuDNN and the reference, output and gradients, on the check's row."""
    generator = torch.Generator(device=device).manual_seed(0)
    total = sum(CHECK_LENGTHS)
    bounds = [0, *torch.tensor(CHECK_LENGTHS).cumsum(0).tolist()] + [total] * CHECK_EMPTY
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)

    def leaf(n: int) -> torch.Tensor:
        return torch.randn(total, n, head_dim, device=device, generator=generator).to(dtype).requires_grad_()

    q, k, v = leaf(heads), leaf(kv_heads), leaf(kv_heads)
    grad = torch.randn(total, heads, head_dim, device=device, generator=generator).to(dtype)
    results = []
    for way in (
        lambda: attend(q, k, v, cu, max(CHECK_LENGTHS), None),
        lambda: _reference(q, k, v, list(CHECK_LENGTHS)),
    ):
        out = way()
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
        results.append([t.float() for t in (out, dq, dk, dv)])
    return max(
        float((got - want).abs().max() / want.abs().max().clamp_min(1e-6)) for got, want in zip(*results, strict=True)
    )


@functools.cache
def _check_once(device: torch.device, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> bool:
    try:
        worst = _worst_difference(device, heads, kv_heads, head_dim, dtype)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # a missing op, an unsupported layout or build: flash attention serves instead
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
    if torch.cuda.get_device_capability(device)[0] < 9 or not hasattr(torch.ops.aten, "_cudnn_attention_forward"):
        return False
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    index = device.index if device.index is not None else torch.cuda.current_device()
    if not _check_once(torch.device("cuda", index), heads, kv_heads, head_dim, dtype):
        return False
    _verified.add((index, heads, kv_heads, head_dim, dtype))
    return True
