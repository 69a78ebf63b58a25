"""The transpose of a one-byte matrix (an FP8 weight) near the card's memory bandwidth, by a Triton kernel.

FP8 tensor cores read both operands with the contraction dimension contiguous, so the
input-gradient product of an FP8 weight Q [out, in] needs Q^T laid out row-major, while
the forward reads Q itself. Keeping one copy of Q means transposing it once per layer and
step. PyTorch's strided copy moves those bytes with scattered one-byte accesses: on an H100
an FP8 7B step ran at 1.08x bf16's speed with it, where the layout with a second, transposed
copy had run at 1.18x. This kernel moves square tiles,
read along their rows and written along their columns, so both sides are whole runs of a
tile's bytes (Triton stages the tile through shared memory to change its layout).
"""

from __future__ import annotations

import torch

from backpropagate.log import get_logger
from backpropagate.train.torch.fast_path import UntilItFails

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the strided copy is used
    triton = None

TILE = 64
WARPS = 4

log = get_logger("fp8")


if triton is not None:

    @triton.jit
    def _transpose_kernel(src, dst, rows, cols, TILE: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
        c = tl.program_id(1).to(tl.int64) * TILE + tl.arange(0, TILE)
        inside = (r[:, None] < rows) & (c[None, :] < cols)
        tile = tl.load(src + r[:, None] * cols + c[None, :], mask=inside)
        tl.store(dst + c[None, :] * rows + r[:, None], tile, mask=inside)


def transposed_by_kernel(x: torch.Tensor, tile: int = TILE, warps: int = WARPS) -> torch.Tensor:
    """The kernel's transpose (other tiles and warps: the bench); on the CPU only under `TRITON_INTERPRET=1`."""
    rows, cols = x.shape
    src = x.contiguous().view(torch.uint8)
    dst = torch.empty((cols, rows), dtype=torch.uint8, device=x.device)
    _transpose_kernel[(triton.cdiv(rows, tile), triton.cdiv(cols, tile))](
        src, dst, rows, cols, TILE=tile, num_warps=warps
    )
    return dst.view(x.dtype)


def strided_copy(x: torch.Tensor) -> torch.Tensor:
    """PyTorch's transpose copy: the plain path, and what the bench measures the kernel against."""
    return x.t().contiguous()


# `x.t().contiguous()` for a contiguous 2-D tensor of one-byte elements: by the kernel on CUDA.
transposed = UntilItFails(
    transposed_by_kernel if triton is not None else None,
    strided_copy,
    "the FP8 transpose kernel",
    "PyTorch's copy",
    log,
)
