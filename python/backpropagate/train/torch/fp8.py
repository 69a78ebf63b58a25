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
folded into the gradient, which measured worse. `torch._scaled_mm` takes row-wise scales
as vectors, so s is passed repeated ([1, out] and [1, in], a few KiB).

The activations `x` and gradients `dy` are quantized per token on the fly (e4m3, amax / 448).
LoRA's A and B, the norms, embeddings, LM head and the loss stay in bf16 / fp32; only the
base matmuls of adapted linear layers run in FP8. `_scaled_mm` with row-wise scales needs
FP8 tensor cores on CUDA (compute capability 8.9: Ada, Hopper, Blackwell) and bf16 output;
on the CPU the same products of the e4m3 values are computed in fp32, slowly, which is
what the tests run.
"""

from __future__ import annotations

import types
import weakref
from dataclasses import dataclass
from typing import Any, cast

import torch

from backpropagate.errors import ConfigError
from backpropagate.train.torch import byte_transpose, fp8_rows
from backpropagate.train.torch.fast_path import UntilItFails

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# cuBLASLt's FP8 kernels need both matmul dimensions of the weight to be multiples of 16.
ALIGN = 16
# Compute capability of the first CUDA GPUs with FP8 tensor cores (Ada; Hopper is 9.0).
MIN_CAPABILITY = (8, 9)


@dataclass
class Fp8Weight:
    """The e4m3 copy of one frozen weight and its scale, repeated in the two shapes the matmuls take."""

    data: torch.Tensor  # [out, in] e4m3, W / scale
    out_scale: torch.Tensor  # [1, out] fp32
    in_scale: torch.Tensor  # [1, in] fp32

    @classmethod
    def of(cls, weight: torch.Tensor) -> Fp8Weight:
        """Quantizes a dense [out, in] weight with the scale that maps its absolute maximum to 448."""
        wide = weight.detach().float()
        scale = wide.abs().amax().clamp(min=1e-12) / FP8_MAX
        data = (wide / scale).to(FP8)
        out_features, in_features = weight.shape
        return cls(data, scale.expand(1, out_features).contiguous(), scale.expand(1, in_features).contiguous())

    def forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`x W^T` as [tokens, out]."""
        return scaled_mm(x, self.data, self.out_scale, dtype)

    def input_grad(self, dy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`dy W` as [tokens, in]: the product reads Q^T row-major, transposed here and dropped after."""
        return scaled_mm(dy, byte_transpose.transposed(self.data), self.in_scale, dtype)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of x [n, k] as e4m3, with one fp32 scale per row ([n, 1]) that maps its maximum to 448.

    On CUDA this is one pass of `fp8_rows`' kernel (rows it cannot hold: a compiled kernel);
    eager it would be six passes over a full fp32 copy, which costs more than the FP8 matmul saves.
    """
    if x.is_cuda:
        x = x.detach().contiguous()
        if fp8_rows.fits(x.shape[1]):
            rows, scale = _BY_KERNEL(x)
            return rows, scale
        return _compiled_rows(x)
    return rows_in_fp8(x)


def _compiled_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows_in_fp8` compiled: one graph serves activations and gradients of every width (detached, contiguous)."""
    from backpropagate.train.torch import fused

    rows, scale = fused.kernel("fp8_rows")(x)
    return rows, scale


def rows_in_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` as plain torch operations (what the compiled kernel is made from)."""
    wide = x.float()
    scale = wide.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (wide / scale).to(FP8).contiguous(), scale


# The kernel while it works; should it fail on a card, the compiled kernel from then on.
_BY_KERNEL = UntilItFails(
    fp8_rows.quantized_by_kernel, _compiled_rows, "the FP8 row kernel", "compiled kernels", fp8_rows.log
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
        self.quantized = quantize_rows(x.reshape(-1, x.shape[-1]))
        self.source, self.version = weakref.ref(x, self._forget), x._version
        return self.quantized

    def _forget(self, source: weakref.ref[torch.Tensor]) -> None:
        if source is self.source:
            self.source = self.quantized = None


_LAST_INPUT = _LastInput()


def scaled_mm(
    x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """`x @ W^T` as [tokens, n] for `weight_fp8` = W [n, k] in e4m3 with its [1, n] scales.

    x [..., k] is quantized per token here, once for all the layers that read it in a row.
    """
    x_fp8, x_scale = _LAST_INPUT.of(x)
    if not x.is_cuda:
        # Torch's CPU `_scaled_mm` takes row-wise scales on some builds only (oneDNN's does not):
        # the same product of the e4m3 values, in fp32.
        return (torch.mm(x_fp8.float(), weight_fp8.float().t()) * x_scale * weight_scale).to(dtype)
    out: torch.Tensor = torch._scaled_mm(x_fp8, weight_fp8.t(), scale_a=x_scale, scale_b=weight_scale, out_dtype=dtype)
    return out


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


def install(model: torch.nn.Module) -> int:
    """Moves the base weight of every adapted linear layer that qualifies to FP8; returns how many.

    The bf16 weight is released: the layer's `weight` keeps its shape, dtype and device (one
    element broadcast to the full shape), so code that asks for them still works, while the
    layer's own forward and the fused LoRA path read the FP8 copies.
    """
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        base = cast(Any, module).get_base_layer()
        if not eligible(base):
            continue
        with torch.no_grad():
            base.__dict__["bp_fp8"] = Fp8Weight.of(base.weight)
            shape = base.weight.shape
            base.weight.data = base.weight.new_zeros(1, 1).expand(shape)
        base.forward = types.MethodType(_fp8_forward, base)
        count += 1
    return count
