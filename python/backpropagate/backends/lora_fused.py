"""One autograd function for a frozen linear layer plus its LoRA adapter.

peft's LoRA forward casts the layer input to the adapter's fp32 dtype, runs A and B as
separate modules, adds in fp32 and casts back: a dozen full-size memory passes per layer
per token, and autograd keeps several of those copies alive. Here the same mathematics
runs in the compute dtype with the adapter folded into the base matmul's output:

    y  = x W^T + b + s (x A^T) B^T            (addmm in place, no extra [T, out] tensor)
    dx = dy W + (s dy B) A                    (addmm in place)
    dA = (s dy B)^T x,   dB = s dy^T (x A^T)

Only `x` and the rank-r product `x A^T` are kept for backward. 4-bit (bitsandbytes) base
weights are dequantized for the matmul in forward and again in backward, never stored.
The adapter's parameters stay peft's (fp32 masters, saved in PEFT format); this module
only replaces `forward` on eligible layers and falls back to peft's own code otherwise
(DoRA, dropout > 0, several adapters, merged or disabled adapters).
"""

from __future__ import annotations

import types
from typing import Any, cast

import torch
import torch.nn.functional as F


def dense_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight as a dense [out, in] tensor in `dtype` (dequantized if 4-bit)."""
    weight = cast(torch.Tensor, base.weight)
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        return cast(torch.Tensor, bnbf.dequantize_4bit(weight.data, quant_state)).to(dtype)
    return weight.to(dtype)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, base: torch.nn.Module, scale: float
    ) -> torch.Tensor:
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        bias = getattr(base, "bias", None)
        bias = bias.to(dtype) if bias is not None else None
        y = F.linear(x2, dense_weight(base, dtype), bias)
        low = torch.mm(x2, lora_a.to(dtype).t()).mul_(scale)
        y.addmm_(low, lora_b.to(dtype).t())
        ctx.save_for_backward(x, low, lora_a, lora_b)
        ctx.base, ctx.scale = base, scale
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, low, lora_a, lora_b = ctx.saved_tensors
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
        a = lora_a.to(dtype)
        d_low = torch.mm(dy2, lora_b.to(dtype)).mul_(ctx.scale)
        d_b = torch.mm(dy2.t(), low) if ctx.needs_input_grad[2] else None
        d_a = torch.mm(d_low.t(), x2) if ctx.needs_input_grad[1] else None
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(dy2, dense_weight(ctx.base, dtype))
            dx.addmm_(d_low, a)
            dx = dx.view_as(x)
        return (
            dx,
            None if d_a is None else d_a.to(lora_a.dtype),
            None if d_b is None else d_b.to(lora_b.dtype),
            None,
            None,
        )


def lora_linear(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, base: torch.nn.Module, scale: float
) -> torch.Tensor:
    """`base(x) + scale * x A^T B^T` with the memory and speed of one fused op (see module doc)."""
    out: torch.Tensor = _LoraLinear.apply(x, lora_a, lora_b, base, scale)
    return out


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    adapters = self.active_adapters
    if (
        args
        or kwargs
        or self.disable_adapters
        or self.merged
        or len(adapters) != 1
        or adapters[0] not in self.lora_A
        or adapters[0] in getattr(self, "lora_variant", {})
        or (self.training and not isinstance(self.lora_dropout[adapters[0]], torch.nn.Identity))
    ):
        return self._peft_forward(x, *args, **kwargs)
    name = adapters[0]
    return lora_linear(
        x, self.lora_A[name].weight, self.lora_B[name].weight, self.get_base_layer(), float(self.scaling[name])
    )


def is_fusable(module: torch.nn.Module) -> bool:
    """A peft LoRA linear layer (dense or 4-bit base) with a frozen base weight."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer) or not hasattr(module, "lora_A"):
        return False
    base = module.get_base_layer()
    weight = getattr(base, "weight", None)
    if weight is None or weight.requires_grad or weight.ndim != 2:
        return False
    dense = isinstance(base, torch.nn.Linear) and getattr(weight, "quant_state", None) is None
    four_bit = getattr(weight, "quant_state", None) is not None and type(base).__name__ == "Linear4bit"
    return dense or four_bit


def install(model: torch.nn.Module) -> int:
    """Routes every eligible LoRA layer of `model` through `lora_linear`; returns how many."""
    count = 0
    for module in model.modules():
        if is_fusable(module) and not hasattr(module, "_peft_forward"):
            setattr(module, "_peft_forward", module.forward)  # noqa: B010 (not a declared attribute)
            setattr(module, "forward", types.MethodType(_fused_forward, module))  # noqa: B010
            count += 1
    return count
