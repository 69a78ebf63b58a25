"""One autograd function for a frozen linear layer plus its LoRA adapter.

peft's LoRA forward casts the layer input to the adapter's fp32 dtype, runs A and B as
separate modules, adds in fp32 and casts back: a dozen full-size memory passes per layer
per token, and autograd keeps several of those copies alive. Here the same mathematics
runs in the compute dtype with the adapter folded into the base matmul's output:

    y  = x W^T + b + (x A^T) (s B)^T          (the base matmul accumulates onto the rank-r part)
    dx = dy W + (dy (s B)) A                  (addmm in place)
    dA = (dy (s B))^T x,   dB = s dy^T (x A^T)

Only `x` and the rank-r product `x A^T` are kept for backward. The adapter's parameters
stay peft's fp32 masters (saved in PEFT format); their compute-dtype copies, A and s B, are
made once per optimizer step, not per call (the training loop calls `adapters_updated` after
each step: fused optimizers change the masters without bumping their version counters). 4-bit (bitsandbytes) base weights are
dequantized for each matmul and never stored, except in a layer that recomputes its
activations: there the recomputation, which runs just before the layer's backward, keeps
its dequantized weight for that backward, so each weight is dequantized twice per step
instead of three times (one layer's dense weights are alive at a time). The nested
quantization of the 4-bit block scales is undone once and kept (4 bytes per 64 weights).
An FP8 base weight (`fp8.py`) is never made dense: both base matmuls read its e4m3 copy.

This module only replaces `forward` on eligible layers and falls back to peft's own code
otherwise (DoRA, dropout > 0, several adapters, merged or disabled adapters).
"""

from __future__ import annotations

import types
from typing import Any, cast

import torch

from backpropagate.train.torch import fp8, nf4, recompute

# Adapter gradients come out of the matmul in fp32 on CUDA (no bf16 rounding, no cast).
_MM_TO_FP32 = hasattr(torch.ops.aten.mm, "dtype")
# Bumped whenever an optimizer has changed adapter masters (see `adapters_updated`).
_generation = 0


def adapters_updated() -> None:
    """Marks every cached compute-dtype adapter copy stale; call after each optimizer step."""
    global _generation
    _generation += 1


def _block_scales(weight: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """fp32 absmax per block of a 4-bit weight, with double quantization undone once and cached."""
    cached: torch.Tensor | None = getattr(quant_state, "bp_absmax", None)
    if cached is None or cached.device != weight.device:
        if quant_state.nested:
            import bitsandbytes.functional as bnbf

            cached = (bnbf.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset).float()
        else:
            cached = quant_state.absmax.float()
        quant_state.bp_absmax = cached
    return cached


def dense_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight as a dense [out, in] tensor in `dtype` (dequantized if 4-bit)."""
    weight = cast(torch.Tensor, base.weight)
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight.to(dtype)
    data = weight.data
    absmax = _block_scales(data, quant_state)
    if nf4.supported(data, quant_state):
        dense = nf4.dequantize(data, absmax, quant_state, dtype)
    else:
        dense = torch.ops.bitsandbytes.dequantize_4bit.default(
            data, absmax, quant_state.blocksize, quant_state.quant_type, quant_state.shape, dtype
        )
    return dense.t() if data.shape[0] == 1 else dense  # packed weights stored as one row come back transposed


def adapter_copies(layer: Any, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, dtype: torch.dtype) -> Any:
    """(A, s B) in `dtype`, remade only when the optimizer has changed the masters."""
    key = (_generation, lora_a._version, lora_b._version, lora_a.data_ptr(), lora_b.data_ptr(), dtype, scale)
    cached = layer.__dict__.get("_bp_copies")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            a = lora_a.detach().to(dtype)
            b = lora_b.detach().to(dtype) if scale == 1.0 else (lora_b.detach() * scale).to(dtype)
        cached = (key, a, b)
        layer.__dict__["_bp_copies"] = cached
    return cached[1], cached[2]


def _grad_mm(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """`left @ right` in fp32 (the adapter masters' dtype)."""
    if _MM_TO_FP32 and left.is_cuda and left.dtype != torch.float32:
        return torch.mm(left, right, out_dtype=torch.float32)
    return torch.mm(left, right).float()


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        layer: Any,
        base: torch.nn.Module,
        scale: float,
    ) -> torch.Tensor:
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        a, b_scaled = adapter_copies(layer, lora_a, lora_b, scale, dtype)
        bias = getattr(base, "bias", None)
        low = torch.mm(x2, a.t())
        ctx.base, ctx.scale, ctx.fp8 = base, scale, fp8.of(base)
        weight = dense_weight(base, dtype) if ctx.fp8 is None else None
        # A dense weight is the parameter itself (free to keep); a dequantized one only where
        # the layer recomputes (see the module doc). FP8 weights are read from the layer.
        keep = weight is not None and (
            getattr(base.weight, "quant_state", None) is None or layer.__dict__.get("bp_recomputed", False)
        )
        ctx.save_for_backward(x, low, a, b_scaled, *([weight] if keep else []))
        if layer.__dict__.get("bp_output_unused_in_recompute") and recompute.recomputing():
            out_features = weight.shape[0] if weight is not None else ctx.fp8.data.shape[0]
            return x.new_zeros(*x.shape[:-1], out_features)  # nothing reads it (recompute.py)
        if weight is None:
            y = ctx.fp8.forward(x, dtype)
            y.addmm_(low, b_scaled.t())
            if bias is not None:
                y.add_(bias.to(dtype))
        else:
            # The rank-r product first, then the base matmul accumulates onto it in its epilogue: the
            # other order would read and write the whole [T, out] output once more.
            y = torch.mm(low, b_scaled.t()) if bias is None else torch.addmm(bias.to(dtype), low, b_scaled.t())
            y.addmm_(x2, weight.t())
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, low, a, b_scaled, *kept = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x.dtype)
        d_low = torch.mm(dy2, b_scaled)
        d_a = _grad_mm(d_low.t(), x2) if ctx.needs_input_grad[1] else None
        d_b = None
        if ctx.needs_input_grad[2]:
            d_b = _grad_mm(dy2.t(), low)
            if ctx.scale != 1.0:
                d_b.mul_(ctx.scale)
        dx = None
        if ctx.needs_input_grad[0]:
            if ctx.fp8 is not None:
                dx = ctx.fp8.input_grad(dy2, x.dtype)
            else:
                dx = torch.mm(dy2, kept[0] if kept else dense_weight(ctx.base, x.dtype))
            dx.addmm_(d_low, a)
            dx = dx.view_as(x)
        return dx, d_a, d_b, None, None, None


def lora_linear(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    layer: Any,
    base: torch.nn.Module,
    scale: float,
) -> torch.Tensor:
    """`base(x) + scale * x A^T B^T` for the LoRA `layer`, as one fused op (see module doc)."""
    out: torch.Tensor = _LoraLinear.apply(x, lora_a, lora_b, layer, base, scale)
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
        x, self.lora_A[name].weight, self.lora_B[name].weight, self, self.get_base_layer(), float(self.scaling[name])
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
