"""4-bit base weights dequantized near the card's memory bandwidth, by a Triton kernel.

A QLoRA step dequantizes every base weight twice (forward, then recomputation or
backward). bitsandbytes' kernel moves about half of an H100/H200's memory bandwidth
doing it, which is several percent of a 7B training step. This kernel reads each packed
byte once, looks both of its 4-bit codes up in the 16-entry table, scales them by their
block's absmax and writes the pair side by side. It does bitsandbytes' arithmetic (an fp32
product rounded once to the output dtype), so the results are identical.

Layout (bitsandbytes'): element 2i is the high nibble of byte i, element 2i + 1 the low
one; one fp32 absmax per `blocksize` consecutive elements, in row-major order.
"""

from __future__ import annotations

import math
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: bitsandbytes' own kernels are used
    triton = None

# Packed bytes per program: 4096 output elements.
_BYTES = 2048


if triton is not None:

    @triton.jit
    def _dequantize_kernel(packed, absmax, code, out, n_bytes, BLOCKSIZE: tl.constexpr, BYTES: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BYTES
        offs = start + tl.arange(0, BYTES)
        inside = offs < n_bytes
        byte = tl.load(packed + offs, mask=inside, other=0).to(tl.int32)
        scale = tl.load(absmax + (2 * offs) // BLOCKSIZE, mask=inside, other=0.0)
        high = tl.load(code + (byte >> 4)) * scale
        low = tl.load(code + (byte & 15)) * scale
        pairs = tl.reshape(tl.join(high, low), [2 * BYTES])
        out_offs = 2 * start + tl.arange(0, 2 * BYTES)
        tl.store(out + out_offs, pairs.to(out.dtype.element_ty), mask=out_offs < 2 * n_bytes)


def supported(packed: torch.Tensor, quant_state: Any) -> bool:
    """Whether the kernel can dequantize this weight (NF4 on CUDA with Triton, whole bytes, blocks of pairs)."""
    return (
        triton is not None
        and quant_state.quant_type == "nf4"
        and packed.is_cuda
        and packed.dtype == torch.uint8
        and math.prod(quant_state.shape) == 2 * packed.numel()
        and quant_state.blocksize % 2 == 0
        and quant_state.code is not None
    )


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight in `dtype` from its packed bytes and fp32 block scales."""
    code = quant_state.code
    if code.device != packed.device or code.dtype != torch.float32:
        code = code.to(device=packed.device, dtype=torch.float32)
        quant_state.code = code
    out = torch.empty(tuple(quant_state.shape), dtype=dtype, device=packed.device)
    n_bytes = packed.numel()
    _dequantize_kernel[(triton.cdiv(n_bytes, _BYTES),)](
        packed, absmax, code, out, n_bytes, BLOCKSIZE=quant_state.blocksize, BYTES=_BYTES
    )
    return out
