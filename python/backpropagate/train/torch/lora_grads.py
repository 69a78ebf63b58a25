"""A LoRA layer's two output-gradient products in one read of the output gradient, by a Triton kernel.

Backward of y = x W^T + (x A^T)(s B)^T needs dy (s B) [T, r] (for dA and dx) and
s dy^T (x A^T) [out, r] (for dB). As two matmuls each reads the whole of dy [T, out]:
for a 7B's gate and up projections that is 310 MB twice per layer, and cuBLAS runs both
skinny products at the card's bandwidth, so the second read is pure cost. This kernel reads
each tile of dy once and feeds both products from it. Programs own a block of tokens and a
span of outputs; each writes its partial sums (of dB over its tokens, of dy (s B) over its
outputs) to its own slot, and the slots are added afterwards, so the result does not depend
on the order programs run in (no atomics).
"""

from __future__ import annotations

import torch

from backpropagate.log import get_logger

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the two matmuls are used
    triton = None

# Tokens and outputs per tile: a [256, 64] bf16 tile of dy is 32 KB, and both products are
# tensor-core dots of it (the rank is padded to 16 at least).
BLOCK_T = 256
BLOCK_N = 64
WARPS = 8
# Programs to aim for: a few per SM of a large card, so that reading dy keeps memory busy.
PROGRAMS = 512
# The partial sums of dB take 4 x out x rank bytes per block of tokens: up to this many tokens
# (64 blocks, 78 MB for a 7B's MLP at rank 16) they cost a quarter of the read they save.
# Longer inputs (attention projections at long context) take the two matmuls.
MAX_TOKENS = 16384
# Narrower outputs (attention projections, the down projection's 3,584) are faster as two matmuls:
# at 8,192 tokens on an H100 the kernel took 0.076 ms against their 0.045 (benches/lora_grads_gpu.py).
MIN_OUTPUTS = 8192

log = get_logger("lora")


if triton is not None:

    @triton.jit
    def _grads_kernel(
        dy,
        b,
        low,
        d_low_parts,
        d_b_parts,
        tokens,
        outputs,
        rank,
        low_stride,
        span,
        RANK: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        r = tl.arange(0, RANK)
        row_in = rows < tokens
        r_in = r < rank
        low_tile = tl.load(
            low + rows[:, None] * low_stride + r[None, :], mask=row_in[:, None] & r_in[None, :], other=0.0
        )
        acc = tl.zeros((BLOCK_T, RANK), dtype=tl.float32)
        start = pid_n * span
        for n0 in range(start, tl.minimum(start + span, outputs), BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_in = cols < outputs
            tile = tl.load(
                dy + rows[:, None] * outputs + cols[None, :], mask=row_in[:, None] & col_in[None, :], other=0.0
            )
            b_tile = tl.load(b + cols[:, None] * rank + r[None, :], mask=col_in[:, None] & r_in[None, :], other=0.0)
            acc += tl.dot(tile, b_tile)
            d_b = tl.dot(tl.trans(tile), low_tile)
            part = d_b_parts + pid_t.to(tl.int64) * outputs * RANK
            tl.store(part + cols[:, None] * RANK + r[None, :], d_b, mask=col_in[:, None])
        part = d_low_parts + pid_n.to(tl.int64) * tokens * RANK
        tl.store(part + rows[:, None] * RANK + r[None, :], acc, mask=row_in[:, None])


def fits(dy: torch.Tensor, low: torch.Tensor) -> bool:
    """Whether the kernel takes these operands (Triton, contiguous 16-bit rows, up to `MAX_TOKENS` tokens, rank 128)."""
    return (
        triton is not None
        and dy.dtype in (torch.bfloat16, torch.float16)
        and low.dtype == dy.dtype
        and dy.dim() == 2
        and dy.is_contiguous()
        and 0 < dy.shape[0] <= MAX_TOKENS
        and dy.shape[1] >= MIN_OUTPUTS
        and 0 < low.shape[1] <= 128
        and low.stride(1) == 1
    )


def grads_by_kernel(dy: torch.Tensor, b_scaled: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy @ b_scaled in dy's dtype, dy^T @ low in fp32) for dy [T, out], b_scaled [out, r], low [T, r].

    `low` may be a column slice of a wider tensor (its row stride is read). On the CPU only
    under `TRITON_INTERPRET=1`.
    """
    tokens, outputs = dy.shape  # both positive (`fits`)
    rank = b_scaled.shape[1]
    padded = max(16, triton.next_power_of_2(rank))
    t_blocks = triton.cdiv(tokens, BLOCK_T)
    n_blocks = triton.cdiv(outputs, BLOCK_N)
    splits = max(1, min(n_blocks, PROGRAMS // max(1, t_blocks)))
    span = triton.cdiv(n_blocks, splits) * BLOCK_N
    splits = triton.cdiv(outputs, span)
    d_low_parts = torch.empty((splits, tokens, padded), dtype=torch.float32, device=dy.device)
    d_b_parts = torch.empty((t_blocks, outputs, padded), dtype=torch.float32, device=dy.device)
    _grads_kernel[(t_blocks, splits)](
        dy,
        b_scaled.contiguous(),
        low,
        d_low_parts,
        d_b_parts,
        tokens,
        outputs,
        rank,
        low.stride(0),
        span,
        RANK=padded,
        BLOCK_T=BLOCK_T,
        BLOCK_N=BLOCK_N,
        num_warps=WARPS,
    )
    d_low = d_low_parts.sum(0)[:, :rank].to(dy.dtype)
    d_b = d_b_parts.sum(0)[:, :rank]
    return d_low, d_b
