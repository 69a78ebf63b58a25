"""Per-token FP8 quantization in one pass over the rows, by a Triton kernel.

Every FP8 product quantizes its activation or gradient rows on the fly (e4m3, each row's
absolute maximum to 448). The compiled version of `fp8.rows_in_fp8` reduces rows wider than
a few thousand values in a loop and then reads them again to scale them, so a row of 18,944
(a 7B MLP's width, the down projection's input and the gate and up projections' output
gradients) is read twice: about 0.36 ms for 8,192 tokens on an H100, against the 0.14 ms
that one read and one write take. This kernel holds a whole row in registers: one read,
one write of the bytes, one scale.
"""

from __future__ import annotations

import torch

from backpropagate.log import get_logger

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the compiled or plain path is used
    triton = None

# Widest row one program holds in registers (fp32 values, up to 64 a thread at 16 warps); wider rows are compiled.
MAX_BLOCK = 32768
# e4m3's largest finite value, which each row's maximum maps to.
LIMIT = float(torch.finfo(torch.float8_e4m3fn).max)

log = get_logger("fp8")


if triton is not None:

    @triton.jit
    def _rows_kernel(src, dst, scales, cols, LIMIT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        inside = c < cols
        x = tl.load(src + row * cols + c, mask=inside, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / LIMIT
        tl.store(dst + row * cols + c, (x / scale).to(dst.dtype.element_ty), mask=inside)
        tl.store(scales + row, scale)


def warps_for(block: int) -> int:
    """Warps per program: enough threads that each holds at most 64 of the row's values."""
    return min(16, max(4, block // 2048))


def fits(cols: int) -> bool:
    """Whether the kernel takes rows of `cols` values (Triton installed, the row within `MAX_BLOCK`)."""
    return triton is not None and 0 < cols <= MAX_BLOCK


def quantized_by_kernel(
    x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, warps: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8.rows_in_fp8(x)` for a contiguous 2-D `x` of rows that `fits`; on the CPU only under `TRITON_INTERPRET=1`.

    `dtype` float32 leaves the scaled values unrounded: what the CPU tests check, since the
    interpreter's e4m3 cast is not the card's (it rounds some values to a neighbour's code).
    `warps` other than `warps_for`'s: the bench.
    """
    rows, cols = x.shape
    block = triton.next_power_of_2(cols)
    values = torch.empty((rows, cols), dtype=dtype, device=x.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        _rows_kernel[(rows,)](x, values, scales, cols, LIMIT=LIMIT, BLOCK=block, num_warps=warps or warps_for(block))
    return values, scales
