"""FP8 base weights rounded for the data they will multiply (GPTQ onto the e4m3 grid).

Rounding each weight to its nearest e4m3 value leaves an error of a few percent per weight,
and those errors add up in a product however the inputs lean. GPTQ (Frantar et al., 2022)
rounds the columns of W [out, in] one at a time and moves each column's rounding error onto
the columns not yet rounded, weighted by how the inputs correlate, so that x Q^T stays close
to x W^T for inputs like the ones seen:

    H = sum over inputs of x^T x          (one [in, in] matrix per distinct input)
    U = upper Cholesky factor of (H + damping)^-1
    for each column i:  q_i = e4m3(w_i);  w_j -= (w_i - q_i) U_ij / U_ii  for j > i

The inputs are the training data's own: before training, the first `TOKENS` tokens of the
training rows go through the model once, and every adapted layer is rounded as its input
arrives, so later layers see the earlier ones already in FP8. The grid and the tensor scale
are `fp8`'s, so the products and their kernels do not change; only which e4m3 value each
weight gets does. On SmolLM2-135M and held-out text, that halves the loss FP8 adds to
bf16's (`benches/fp8_quality.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, cast

import numpy as np
import torch

from backpropagate.log import get_logger
from backpropagate.train.torch.fast_path import UntilItFails
from backpropagate.train.torch.fp8_rows import LIMIT

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs round column by column
    triton = None

log = get_logger("fp8")

# Tokens of training data the weights are rounded for.
TOKENS = 16_384
# Longest calibration sequence (shorter rows are cut from the token stream as they come).
SEQUENCE = 2048
# Columns rounded together before their error moves on to the rest in one product.
BLOCK = 128
# Rows of the weight one kernel program rounds.
KERNEL_ROWS = 16
# Added to H's diagonal, relative to its mean: inputs seen rarely keep the rounding plain.
DAMPING = 0.01


def calibration_ids(input_ids: np.ndarray, length: int, tokens: int = TOKENS) -> torch.Tensor:
    """The first `tokens` of a token stream as rows of `length` (at most `SEQUENCE`) [rows, length]."""
    length = max(1, min(length, SEQUENCE))
    usable = min(tokens, len(input_ids)) // length * length
    if usable == 0:  # less data than one row: one shorter row
        usable = length = min(tokens, len(input_ids))
    return torch.from_numpy(np.asarray(input_ids[:usable], dtype=np.int64)).view(-1, length)


def upper_inverse(hessian: torch.Tensor) -> torch.Tensor:
    """U, the upper Cholesky factor of (H + damping)^-1, in fp32 (columns never seen get H_ii = 1).

    H is damped in place: a 7B's down-projection has an [18944, 18944] one, 1.4 GB in fp32.
    """
    diagonal = hessian.diagonal()
    diagonal[diagonal == 0] = 1.0
    damping = DAMPING * float(diagonal.mean())
    for _ in range(4):  # more damping where rounding in fp32 left H short of positive definite
        diagonal.add_(damping)
        factor, info = torch.linalg.cholesky_ex(hessian)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True).contiguous()
        damping *= 10
    raise torch.linalg.LinAlgError("the input correlations are not positive definite even with damping")


def rounded(values: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """W / s [out, in] (fp32, within +-448) on the e4m3 grid, each column's error moved on by `upper`."""
    w = values.float().clone()
    k = w.shape[1]
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        errors = _BLOCK_ROUNDED(w, upper, start, end)
        if end < k:
            w[:, end:].sub_(errors @ upper[start:end, end:])
    return w


def nearest(values: torch.Tensor) -> torch.Tensor:
    """The e4m3 values nearest to fp32 `values` (saturating at +-448), as fp32."""
    return values.clamp(-LIMIT, LIMIT).to(torch.float8_e4m3fn).float()


def _block_in_steps(w: torch.Tensor, upper: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rounds columns [start, end) of `w` in place, one at a time; returns their errors over U_ii [out, end - start]."""
    block = w[:, start:end]
    errors = torch.empty_like(block)
    u = upper[start:end, start:end]
    for i in range(end - start):
        column = block[:, i]
        on_grid = nearest(column)
        error = (column - on_grid) / u[i, i]
        block[:, i:].sub_(error.unsqueeze(1) * u[i, i:].unsqueeze(0))
        block[:, i] = on_grid
        errors[:, i] = error
    return errors


if triton is not None:

    @triton.jit
    def _nearest(v, LIMIT: tl.constexpr):
        """e4m3's nearest value in fp32 arithmetic: round to the binade's quantum by adding and taking away 1.5 x 2^(23 + m)."""
        v = tl.minimum(tl.maximum(v, -LIMIT), LIMIT)
        exponent = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        m = tl.maximum(exponent, -6) - 3  # 3 mantissa bits; below 2^-6 the subnormals' quantum 2^-9
        magic = (((m + 150) << 23) | (1 << 22)).to(tl.float32, bitcast=True)
        return (v + magic) - magic

    @triton.jit
    def _block_kernel(
        w, errors, upper, rows, cols, start, width, LIMIT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr
    ):
        r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, BLOCK)
        inside = (r[:, None] < rows) & (c[None, :] < width)
        at = r[:, None] * cols + start + c[None, :]
        tile = tl.load(w + at, mask=inside, other=0.0)
        errs = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        for i in range(0, width):
            row = upper + (start + i) * cols + start
            u = tl.load(row + c, mask=c < width, other=0.0)  # zero left of the diagonal: U is upper
            u_ii = tl.load(row + i)
            pick = c[None, :] == i
            column = tl.sum(tl.where(pick, tile, 0.0), axis=1)
            on_grid = _nearest(column, LIMIT)
            error = (column - on_grid) / u_ii
            tile = tl.where(pick, on_grid[:, None], tile - error[:, None] * u[None, :])
            errs = tl.where(pick, error[:, None], errs)
        tl.store(w + at, tile, mask=inside)
        tl.store(errors + r[:, None] * BLOCK + c[None, :], errs, mask=inside)


def _block_by_kernel(w: torch.Tensor, upper: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """`_block_in_steps` in one kernel: a program holds `KERNEL_ROWS` rows of the block and rounds its columns in turn."""
    rows, cols = w.shape
    errors = torch.empty(rows, BLOCK, device=w.device, dtype=torch.float32)
    grid = (triton.cdiv(rows, KERNEL_ROWS),)
    _block_kernel[grid](w, errors, upper, rows, cols, start, end - start, LIMIT=LIMIT, ROWS=KERNEL_ROWS, BLOCK=BLOCK)
    return errors[:, : end - start]


_BLOCK_ROUNDED = UntilItFails(
    _block_by_kernel if triton is not None else None,
    _block_in_steps,
    "the FP8 rounding kernel",
    "rounding column by column",
    log,
)


class _Inputs:
    """The last input seen and its U, so that layers reading one input (q, k, v) share one."""

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None
        self.upper: torch.Tensor | None = None

    def upper_of(self, x: torch.Tensor) -> torch.Tensor:
        if self.x is not x or self.upper is None:
            rows = x.reshape(-1, x.shape[-1])
            hessian = torch.zeros(rows.shape[1], rows.shape[1], device=x.device, dtype=torch.float32)
            for chunk in rows.split(4096):
                chunk32 = chunk.float()
                hessian.addmm_(chunk32.t(), chunk32)
            self.x, self.upper = x, upper_inverse(hessian)
        return self.upper


def round_while_running(
    model: torch.nn.Module,
    layers: Iterable[torch.nn.Linear],
    ids: torch.Tensor,
    install: Callable[[torch.nn.Linear, torch.Tensor | None], None],
) -> int:
    """Runs `ids` through `model` and has `install(layer, U)` each of `layers` as its input arrives; returns how many.

    A layer's output then comes from what `install` made of it, so later layers see it. The LM
    head is skipped where the model names its decoder.
    """
    started = time.perf_counter()
    pending = set(layers)
    total = len(pending)
    inputs = _Inputs()
    handles = []

    def hook(layer: torch.nn.Linear, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        if layer not in pending:
            return output
        install(layer, inputs.upper_of(args[0]))
        pending.discard(layer)
        return layer.forward(args[0])  # the installed forward, without this hook

    for layer in pending:
        handles.append(layer.register_forward_hook(hook))
    inner: Any = cast(Any, model).get_base_model() if hasattr(model, "get_base_model") else model  # peft's wrapper
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else inner
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            decoder(input_ids=ids.to(device), use_cache=False)
    except torch.OutOfMemoryError:
        # The pass holds its tokens' activations and one input's H: where they do not fit, the
        # layers not reached yet keep the nearest values rather than the run failing.
        log.warning(
            "out of memory rounding FP8 weights for the data after %d of %d layers; the rest are rounded to nearest",
            total - len(pending),
            total,
        )
    finally:
        for handle in handles:
            handle.remove()
        inputs.x = inputs.upper = None
    done = total - len(pending)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log.info(
        "%d FP8 weights rounded for %d tokens of the training data in %.1f s",
        done,
        ids.numel(),
        time.perf_counter() - started,
    )
    return done
