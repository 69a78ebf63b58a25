"""FP8 quantization of activation rows in one pass, by Triton kernels: per token, or per block of 128.

Every FP8 product quantizes its activation or gradient rows on the fly (e4m3, each row's
absolute maximum to 448). The compiled version of `fp8.rows_in_fp8` reduces rows wider than
a few thousand values in a loop and then reads them again to scale them, so a row of 18,944
(a 7B MLP's width, the down projection's input and the gate and up projections' output
gradients) is read twice: about 0.36 ms for 8,192 tokens on an H100, against the 0.14 ms
that one read and one write take. This kernel holds a whole row in registers: one read,
one write of the bytes, one scale.

Per block (`blocks_by_kernel`), each row gets one scale per 128 values, cuBLAS's 1 x 128
layout. A program takes a tile of rows by one block, so the scales, which cuBLAS reads
token-contiguous ([blocks, rows] in memory), are written in whole runs as well.
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
# Rows a program of the block kernel takes: 32 scales make one 128-byte write.
TILE_ROWS = 32
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

    @triton.jit
    def _blocks_kernel(src, dst, scales, rows, cols, LIMIT: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        block = tl.program_id(1).to(tl.int64)
        c = block * BLOCK + tl.arange(0, BLOCK)
        inside = (r[:, None] < rows) & (c[None, :] < cols)
        at = r[:, None] * cols + c[None, :]
        x = tl.load(src + at, mask=inside, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) / LIMIT
        tl.store(dst + at, (x / scale[:, None]).to(dst.dtype.element_ty), mask=inside)
        tl.store(scales + block * rows + r, scale, mask=r < rows)


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


def blocks_by_kernel(
    x: torch.Tensor, block: int, dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8.blocks_in_fp8(x)` for a contiguous 2-D `x`; on the CPU only under `TRITON_INTERPRET=1` (`dtype` as above).

    The scales come as [rows, ceil(cols / block)] over memory laid out [blocks, rows].
    """
    rows, cols = x.shape
    blocks = triton.cdiv(cols, block)
    values = torch.empty((rows, cols), dtype=dtype, device=x.device)
    scales = torch.empty((blocks, rows), dtype=torch.float32, device=x.device)
    if rows and cols:
        grid = (triton.cdiv(rows, TILE_ROWS), blocks)
        _blocks_kernel[grid](x, values, scales, rows, cols, LIMIT=LIMIT, BLOCK=block, ROWS=TILE_ROWS, num_warps=4)
    return values, scales.t()
