"""FP8 base weights for LoRA (`fp8=True`): stored and multiplied in float8 e4m3, one byte a weight.

A frozen base weight W [out, in] becomes one e4m3 copy Q = W / s with one fp32 scale s for
the whole tensor, read by both matmuls that use it:

    forward   y  = x W^T = s * x Q^T
    backward  dx = dy W  = s * dy Q      (Q transposed for the product, one layer at a time)

One scale for the tensor, not one per row: e4m3 is a floating-point format, so a row's
values keep their 3 mantissa bits whatever its range, and on SmolLM2's weights the
rounding error is 2.65% with a tensor scale against 2.63% with row scales. What a tensor
scale buys is that both products read the same bytes, where row scales would need a copy
per product (each matmul scales along its own output dimension), or the backward's scales
folded into the gradient, which measured worse. `torch._scaled_mm` takes the weight's scales
in the product's layout, so s is passed repeated over W's 128 x 128 blocks (or, per token,
over its rows), a few KiB. Which e4m3 value each weight gets is chosen for the training
data's inputs where they are known (`fp8_gptq`), else the nearest.

The activations `x` and gradients `dy` are quantized on the fly (e4m3) with one scale per
block of 128 values of a token (cuBLAS's 1 x 128 block scaling, with the weight's scale laid
out as its 128 x 128 blocks): a few outlier channels then only coarsen their own block rather
than pushing the rest of the token toward e4m3's subnormals. On SmolLM2 that takes about a
quarter off FP8's loss gap against per-token scales (`benches/fp8_quality.py --scales`), for
3-10% on the products (`benches/fp8_blocks_gpu.py`). Where cuBLAS has no block-scaled kernels
(CUDA before 12.9), a probe finds that out once and the scales are per token.
LoRA's A and B, the norms, embeddings, LM head and the loss stay in bf16 / fp32; only the
base matmuls of adapted linear layers run in FP8. `_scaled_mm` needs FP8 tensor cores on
CUDA (compute capability 8.9: Ada, Hopper, Blackwell) and bf16 output; on the CPU the same
products of the e4m3 values are computed in fp32, slowly, which is what the tests run.
"""

from __future__ import annotations

import types
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch

from backpropagate.errors import ConfigError
from backpropagate.train.torch import byte_transpose, fp8_gptq, fp8_rows
from backpropagate.train.torch.fast_path import UntilItFails

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# cuBLASLt's FP8 kernels need both matmul dimensions of the weight to be multiples of 16.
ALIGN = 16
# Compute capability of the first CUDA GPUs with FP8 tensor cores (Ada; Hopper is 9.0).
MIN_CAPABILITY = (8, 9)
# Values of a token that share one activation scale (cuBLAS's 1 x 128 block scaling).
BLOCK = 128

# How the weight's 128 x 128 scales are strided for `torch._scaled_mm` (builds check one or the other):
BLOCKS = "blocks"  # rows of ceil(k / 128)
BLOCKS_PADDED = "blocks, padded"  # rows padded to a multiple of 4


@dataclass(frozen=True)
class Layout:
    """The FP8 scales a device's `_scaled_mm` takes: per token always; per 1 x 128 block where cuBLAS has them.

    `blocks` is the weight scales' stride (None: per token only). `partial`: whether a contracted
    dimension may end in a partial block of 128.
    """

    blocks: str | None
    partial: bool

    def blocks_for(self, k: int) -> bool:
        """Whether a product contracting `k` values is block-scaled.

        A row of one block is scaled per token: the same numbers, the simpler kernel.
        """
        return self.blocks is not None and k > BLOCK and (self.partial or k % BLOCK == 0)


def weight_scales(scale: torch.Tensor, n: int, k: int, blocks: str | None) -> torch.Tensor:
    """`scale_b` of `torch._scaled_mm(x, W^T)` for W [n, k] with one tensor `scale`: per token, or in `blocks`' stride.

    The block grid is a view into a buffer of `scale` sized for rows and columns padded to
    multiples of 4: with rows that are not a multiple of 4 long, cuBLAS reads past the grid
    (on an H100 with torch 2.11 and CUDA 13, grids of 2, 3 or 5 columns gave products wrong by
    3% to 770 times their size, with no error), and every value it may read there is the scale.
    """
    one = scale.reshape(1, 1)
    if blocks is None:
        return one.expand(1, n).contiguous()
    rows, cols = -(-n // BLOCK), -(-k // BLOCK)
    stride = cols if blocks == BLOCKS else -(-cols // 4) * 4
    room = -(-rows // 4) * 4 * (-(-cols // 4) * 4)
    buffer = one.expand(1, room).contiguous()
    return buffer.as_strided((rows, cols), (stride, 1)).t()


class ProductScales(NamedTuple):
    """The weight's scale as one product takes it, per token and (where the device has them) per block."""

    tokens: torch.Tensor
    blocks: torch.Tensor | None

    @classmethod
    def of(cls, scale: torch.Tensor, n: int, k: int, layout: Layout) -> ProductScales:
        """The scales of a product with W [n, k] on the right, in the layouts `layout` has."""
        blocks = None if layout.blocks is None else weight_scales(scale, n, k, layout.blocks)
        return cls(weight_scales(scale, n, k, None), blocks)

    def matching(self, x_scale: torch.Tensor) -> torch.Tensor:
        """The weight's scales that go with activations scaled as `x_scale` ([n, 1]: per token)."""
        return self.tokens if x_scale.shape[1] == 1 or self.blocks is None else self.blocks


@dataclass
class Fp8Weight:
    """The e4m3 copy of one frozen weight, its scale, and that scale in the layouts of its two products."""

    data: torch.Tensor  # [out, in] e4m3, W / scale
    scale: torch.Tensor  # [] fp32
    forward_scales: ProductScales  # of x Q^T
    backward_scales: ProductScales  # of dy Q
    for_data: bool = False  # rounded for its inputs (`fp8_gptq`) rather than to nearest

    @classmethod
    def of(cls, weight: torch.Tensor, upper: torch.Tensor | None = None) -> Fp8Weight:
        """Quantizes a dense [out, in] weight with the scale that maps its absolute maximum to 448.

        Each value goes to its nearest e4m3 value, or, given `upper` (`fp8_gptq.upper_inverse`
        of its inputs' correlations), to the one GPTQ picks for those inputs.
        """
        wide = weight.detach().float()
        scale = wide.abs().amax().clamp(min=1e-12) / FP8_MAX
        values = wide / scale
        out_features, in_features = weight.shape
        layout = layout_on(weight.device)
        return cls(
            (values if upper is None else fp8_gptq.rounded(values, upper)).to(FP8),
            scale,
            ProductScales.of(scale, out_features, in_features, layout),
            ProductScales.of(scale, in_features, out_features, layout),
            upper is not None,
        )

    def forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`x W^T` as [tokens, out]."""
        return self._product(x, self.data, self.forward_scales, dtype)

    def input_grad(self, dy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`dy W` as [tokens, in]: the product reads Q^T row-major, transposed here and dropped after."""
        return self._product(dy, byte_transpose.transposed(self.data), self.backward_scales, dtype)

    def _product(self, x: torch.Tensor, right: torch.Tensor, scales: ProductScales, dtype: torch.dtype) -> torch.Tensor:
        """`x @ right^T` as [tokens, n] for `right` [n, k] in e4m3; x [..., k] is quantized once for the layers that read it."""
        x_fp8, x_scale = _LAST_INPUT.of(x)
        if x.is_cuda:
            scale_b = scales.matching(x_scale)
            out = torch._scaled_mm(x_fp8, right.t(), scale_a=x_scale, scale_b=scale_b, out_dtype=dtype)
        else:
            # Torch's CPU `_scaled_mm` takes row-wise or block scales on some builds only (oneDNN's
            # does not): the same product of the e4m3 values, in fp32.
            out = (torch.mm(dequantized(x_fp8, x_scale), right.float().t()) * self.scale).to(dtype)
        tokens = x.numel() // x.shape[-1]
        return out if out.shape[0] == tokens else out[:tokens]  # without `quantize_blocks`' padding rows


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of x [n, k] in e4m3: per block ([n, ceil(k / 128)] scales) where its device multiplies them, else per token ([n, 1])."""
    if layout_on(x.device).blocks_for(x.shape[1]):
        return quantize_blocks(x)
    return quantize_rows(x)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of x [n, k] as e4m3, with one fp32 scale per row ([n, 1]) that maps its maximum to 448.

    On CUDA this is one pass of `fp8_rows`' kernel (rows it cannot hold: a compiled kernel);
    eager it would be six passes over a full fp32 copy, which costs more than the FP8 matmul saves.
    """
    if x.is_cuda:
        x = x.detach().contiguous()
        if fp8_rows.fits(x.shape[1]):
            rows, scale = _ROWS_BY_KERNEL(x)
            return rows, scale
        return _compiled("fp8_rows", x)
    return rows_in_fp8(x)


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of x [n, k] as e4m3 with one fp32 scale per 128 values, mapping each block's maximum to 448.

    The scales are [n, ceil(k / 128)], n contiguous, as cuBLAS reads them; the last block of a
    row may be partial. The rows are padded with zeros to a multiple of 4 (cuBLAS refuses block
    scales for other token counts; the CPU does the same), so a product's output has those rows
    too, dropped after it. On CUDA one pass of `fp8_rows`' block kernel.
    """
    x = x.detach()
    if x.shape[0] % 4:
        x = torch.nn.functional.pad(x, (0, 0, 0, -x.shape[0] % 4))
    if x.is_cuda:
        values, scales = _BLOCKS_BY_KERNEL(x.contiguous())
        # The compiled fallback may lay the scales out its own way.
        return values, scales if scales.stride(0) == 1 else scales.t().contiguous().t()
    return blocks_in_fp8(x)


def _compiled(name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows_in_fp8` or `blocks_in_fp8` compiled: one graph serves every width (detached, contiguous)."""
    from backpropagate.train.torch import fused

    values, scale = fused.kernel(name)(x)
    return values, scale


def rows_in_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` as plain torch operations (what the compiled kernel is made from)."""
    wide = x.float()
    scale = wide.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (wide / scale).to(FP8).contiguous(), scale


def blocks_in_fp8(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_blocks` as plain torch operations; other `block` sizes: the quality bench."""
    wide = x.float()
    n, k = wide.shape
    blocks = torch.nn.functional.pad(wide, (0, -k % block)).view(n, -(-k // block), block)
    scale = blocks.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    values = (blocks / scale).to(FP8).flatten(1)[:, :k].contiguous()
    return values, scale.flatten(1).t().contiguous().t()


def dequantized(values: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """The fp32 values that e4m3 `values` [n, k] stand for under per-token ([n, 1]) or per-`block` scales."""
    if scale.shape[1] == 1:
        return values.float() * scale
    n, k = values.shape
    wide = torch.nn.functional.pad(values.float(), (0, -k % block)).view(n, scale.shape[1], block)
    return (wide * scale.reshape(n, scale.shape[1], 1)).flatten(1)[:, :k]


# The kernels while they work; should one fail on a card, the compiled kernel from then on.
_ROWS_BY_KERNEL = UntilItFails(
    fp8_rows.quantized_by_kernel,
    lambda x: _compiled("fp8_rows", x),
    "the FP8 row kernel",
    "compiled kernels",
    fp8_rows.log,
)
_BLOCKS_BY_KERNEL = UntilItFails(
    None if fp8_rows.triton is None else lambda x: fp8_rows.blocks_by_kernel(x, BLOCK),
    lambda x: _compiled("fp8_blocks", x),
    "the FP8 block kernel",
    "compiled kernels",
    fp8_rows.log,
)


class _LastInput:
    """The FP8 copy of the last input quantized: q, k and v (and gate and up) multiply the same one.

    The tensor is held by a weak reference and compared by identity and version, so a new
    tensor at a reused address, or one changed in place, is never mistaken for it; its copy
    goes when it does.
    """

    def __init__(self) -> None:
        self.source: weakref.ref[torch.Tensor] | None = None
        self.version = -1
        self.quantized: tuple[torch.Tensor, torch.Tensor] | None = None

    def of(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.quantized is not None and self.source is not None and self.source() is x and self.version == x._version:
            return self.quantized
        self.quantized = quantize(x.reshape(-1, x.shape[-1]))
        self.source, self.version = weakref.ref(x, self._forget), x._version
        return self.quantized

    def _forget(self, source: weakref.ref[torch.Tensor]) -> None:
        if source is self.source:
            self.source = self.quantized = None


_LAST_INPUT = _LastInput()


def layout_on(device: torch.device) -> Layout:
    """The scales FP8 products take on `device`: on the CPU (emulated) block scales everywhere; on CUDA what the probe found."""
    if device.type != "cuda":
        return Layout(BLOCKS, partial=True)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PROBED:
        _PROBED[index] = _probe(torch.device("cuda", index))
    return _PROBED[index]


_PROBED: dict[int, Layout] = {}


def scales_feature(device: torch.device) -> str:
    """How FP8 products on `device` scale their activations, as the run's features name it."""
    layout = layout_on(device)
    if layout.blocks is None:
        return "fp8_scales[token]"
    return "fp8_scales[1x128]" if layout.partial else "fp8_scales[1x128, k % 128 == 0]"


def _probe(device: torch.device) -> Layout:
    """Block-scaled products on `device` checked against the exact product of their e4m3 values.

    First a grid of 2 x 3 weight blocks in each stride a build may check for (no block scales
    if neither gives the product: warned once), then a contracted dimension that ends in a
    partial block.
    """
    failures = []
    for blocks in (BLOCKS, BLOCKS_PADDED):
        failed = _probe_product(device, blocks, 384)
        if failed is None:
            return Layout(blocks, partial=_probe_product(device, blocks, 320) is None)
        failures.append(f"{blocks}: {failed}")
    fp8_rows.log.warning(
        "FP8 block scales are not available on %s (%s); activations are scaled per token",
        torch.cuda.get_device_name(device),
        "; ".join(failures),
    )
    return Layout(None, partial=False)


def _probe_product(device: torch.device, blocks: str, k: int) -> str | None:
    """Why a [64, k] x [k, 256] block-scaled product fails or is off on `device`; None if it is right."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(64, k, device=device, generator=g).to(torch.bfloat16)
    w = torch.randn(256, k, device=device, generator=g) * 0.02
    scale = w.abs().amax() / FP8_MAX
    q = (w / scale).to(FP8)
    x_fp8, x_scale = blocks_in_fp8(x)
    want = dequantized(x_fp8, x_scale) @ (q.float() * scale).t()
    try:
        got = torch._scaled_mm(
            x_fp8, q.t(), scale_a=x_scale, scale_b=weight_scales(scale, 256, k, blocks), out_dtype=torch.bfloat16
        )
    except (RuntimeError, NotImplementedError) as failed:
        return str(failed).splitlines()[0][:200]
    error = float((got.float() - want).norm() / want.norm())
    return None if error < 1e-2 else f"{error:.1%} off the exact product"


def capable(device: torch.device) -> bool:
    """Whether `device` multiplies FP8 with row-wise scales (CUDA 8.9+; the CPU computes the same in fp32)."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def check_supported(device: torch.device, compute: torch.dtype) -> None:
    """Refuses `fp8` where it cannot run, naming why (the settings themselves are checked by `TrainConfig`)."""
    if not capable(device):
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(
            "CONFIG_INVALID_SETTING",
            f"fp8=True is invalid on {name} (compute capability {major}.{minor}): FP8 matmuls need compute "
            f"capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada, Hopper, Blackwell)",
            hint="Train without --fp8 (bf16 LoRA or QLoRA) on this GPU.",
        )
    if compute != torch.bfloat16:
        raise ConfigError(
            "CONFIG_INVALID_SETTING",
            f"fp8=True needs bf16 compute, but this run computes in {str(compute).removeprefix('torch.')}",
            hint="Use precision=bf16 (or auto on a GPU or a CPU with bf16 units).",
        )


def eligible(base: torch.nn.Module) -> bool:
    """A dense, frozen linear layer whose dimensions FP8 kernels take."""
    weight = getattr(base, "weight", None)
    return (
        isinstance(base, torch.nn.Linear)
        and weight is not None
        and not weight.requires_grad
        and getattr(weight, "quant_state", None) is None
        and weight.shape[0] % ALIGN == 0
        and weight.shape[1] % ALIGN == 0
    )


def of(base: torch.nn.Module) -> Fp8Weight | None:
    """The FP8 weight `install` gave `base`, if any."""
    return cast(Fp8Weight | None, base.__dict__.get("bp_fp8"))


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T (+ b) and dx = dy W from the one e4m3 copy of W, which is frozen."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Fp8Weight, bias: torch.Tensor | None) -> torch.Tensor:
        y = weight.forward(x, x.dtype)
        if bias is not None:
            y.add_(bias.to(x.dtype))
        ctx.weight, ctx.shape = weight, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        dx = ctx.weight.input_grad(dy, dy.dtype)
        return dx.view(ctx.shape), None, None


def _fp8_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`nn.Linear.forward` of a layer whose weight lives in FP8 (peft's unfused paths call it)."""
    out: torch.Tensor = _Fp8Linear.apply(x, of(self), self.bias)
    return out


def install(model: torch.nn.Module, calibration: torch.Tensor | None = None) -> int:
    """Moves the base weight of every adapted linear layer that qualifies to FP8; returns how many.

    Given `calibration` token ids [rows, length] (the training data's), the weights are rounded
    for those inputs (`fp8_gptq`), else each to its nearest e4m3 value. The bf16 weight is
    released: the layer's `weight` keeps its shape, dtype and device (one element broadcast to
    the full shape), so code that asks for them still works, while the layer's own forward and
    the fused LoRA path read the FP8 copies.
    """
    from peft.tuners.lora import LoraLayer

    layers = [
        base
        for module in model.modules()
        if isinstance(module, LoraLayer) and eligible(base := cast(Any, module).get_base_layer())
    ]
    if calibration is not None and layers:
        fp8_gptq.round_while_running(model, layers, calibration, _install_layer)
    for base in layers:
        if of(base) is None:
            _install_layer(base, None)
    return len(layers)


def rounding_feature(model: torch.nn.Module) -> str:
    """How the FP8 weights of `model` were rounded, as the run's features name it."""
    weights = [w for m in model.modules() if (w := of(m)) is not None]
    for_data = sum(w.for_data for w in weights)
    if for_data == len(weights):
        return "fp8_rounding[gptq]"
    return "fp8_rounding[nearest]" if for_data == 0 else f"fp8_rounding[gptq {for_data} of {len(weights)}]"


def _install_layer(base: Any, upper: torch.Tensor | None) -> None:
    """`base`'s weight in FP8 (rounded for inputs with `upper`, if given) in place of its bf16 one."""
    with torch.no_grad():
        base.__dict__["bp_fp8"] = Fp8Weight.of(base.weight, upper)
        shape = base.weight.shape
        base.weight.data = base.weight.new_zeros(1, 1).expand(shape)
    base.forward = types.MethodType(_fp8_forward, base)
