"""One autograd function for frozen linear layers plus their LoRA adapters.

peft's LoRA forward casts the layer input to the adapter's fp32 dtype, runs A and B as
separate modules, adds in fp32 and casts back: a dozen full-size memory passes per layer
per token, and autograd keeps several of those copies alive. Here the same mathematics
runs in the compute dtype with the adapter folded into the base matmul's output:

    y  = x W^T + b + (x A^T) (s B)^T          (the base matmul accumulates onto the rank-r part)
    dx = (dy (s B)) A + dy W                  (the base matmul accumulates onto the rank-r part)
    dA = (dy (s B))^T x,   dB = s dy^T (x A^T)     (both dy products in one read of dy: `lora_grads`)

Layers that read one input (q, k and v; gate and up: `SharedInput`) run as one op: their A
are stacked so that x A^T is one pass over x for all of them, and their input gradients
accumulate into one tensor instead of being added by autograd. Groups whose outputs are
much wider than their input (gate and up) make their outputs in one matmul each over
[x | x A^T] instead (`lora_concat`).

Only `x` and the rank-r product `x A^T` are kept for backward. The adapter's parameters
stay peft's fp32 masters (saved in PEFT format); their compute-dtype copies, A and s B, are
made once per optimizer step, not per call (the training loop calls `adapters_updated` after
each step: fused optimizers change the masters without bumping their version counters).
4-bit (bitsandbytes) base weights are dequantized for each matmul and never stored, except
in a layer that recomputes its activations: there the recomputation, which runs just before
the layer's backward, keeps its dequantized weight for that backward, so each weight is
dequantized twice per step instead of three times (one layer's dense weights are alive at a
time). The nested quantization of the 4-bit block scales is undone once and kept (4 bytes
per 64 weights).
An FP8 base weight (`fp8.py`) is never made dense: both base matmuls read its e4m3 copy.

This module only replaces `forward` on eligible layers and falls back to peft's own code
otherwise (DoRA, dropout > 0, several adapters, merged or disabled adapters).
"""

from __future__ import annotations

import types
from typing import Any, NamedTuple, cast

import torch

from backpropagate.train.torch import fp8, lora_grads, nf4, recompute
from backpropagate.train.torch.fast_path import UntilItFails

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


def adapter_copies(owner: dict[str, Any], members: list[Member], adapters: tuple[torch.Tensor, ...], dtype: Any) -> Any:
    """(A of every member stacked [sum r, in], [s B per member]) in `dtype`, remade only when the optimizer changed the masters."""
    pairs = list(zip(adapters[::2], adapters[1::2], strict=True))
    key = (_generation, dtype) + tuple(
        (a._version, b._version, a.data_ptr(), b.data_ptr(), m.scale) for (a, b), m in zip(pairs, members, strict=True)
    )
    cached = owner.get("_bp_copies")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            stacked = torch.cat([a.detach() for a, _ in pairs]).to(dtype)
            scaled = [
                (b.detach() if m.scale == 1.0 else b.detach() * m.scale).to(dtype)
                for (_, b), m in zip(pairs, members, strict=True)
            ]
            wide = owner.get("bp_wide")
            if wide is not None:
                wide.load(scaled)  # `lora_concat`: the base weights' buffers hold s B too
        cached = (key, stacked, scaled)
        owner["_bp_copies"] = cached
    return cached[1], cached[2]


def _grad_mm(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """`left @ right` in fp32 (the adapter masters' dtype)."""
    if _MM_TO_FP32 and left.is_cuda and left.dtype != torch.float32:
        return torch.mm(left, right, out_dtype=torch.float32)
    return torch.mm(left, right).float()


class Member(NamedTuple):
    """One LoRA layer of a `_LoraProjections` call: the peft layer, its frozen base and its scale."""

    layer: Any
    base: torch.nn.Module
    scale: float


class _LoraProjections(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, members: list[Member], owner: dict[str, Any], *adapters: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        stacked, scaled = adapter_copies(owner, members, adapters, dtype)
        low = torch.mm(x2, stacked.t())  # every member's rank-r product in one pass over x
        lows = low.split([b.shape[1] for b in scaled], dim=1)
        ctx.members, ctx.fp8 = members, [fp8.of(m.base) for m in members]
        ctx.set_materialize_grads(False)
        wide = owner.get("bp_wide")
        joined = None
        if wide is not None and wide.serves(x2) and not any(_skipped_now(m) for m in members):
            joined = wide.project(x2, low, [getattr(m.base, "bias", None) for m in members])
        kept: list[torch.Tensor | None] = []
        outs = []
        for i, (m, q, low_m, b_m) in enumerate(zip(members, ctx.fp8, lows, scaled, strict=True)):
            weight = dense_weight(m.base, dtype) if q is None else None
            # A dense weight is the parameter itself (free to keep); a dequantized one only where
            # the layer recomputes (see the module doc). FP8 weights are read from the layer.
            keep = weight is not None and (
                getattr(m.base.weight, "quant_state", None) is None or m.layer.__dict__.get("bp_recomputed", False)
            )
            kept.append(weight if keep else None)
            outs.append(joined[i] if joined is not None else _project(x2, low_m, b_m, m, q, weight))
        ctx.save_for_backward(x, low, stacked, *scaled, *kept)
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outs)

    @staticmethod
    def backward(ctx: Any, *dys: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        n = len(ctx.members)
        x, low, stacked, *rest = ctx.saved_tensors
        scaled, kept = rest[:n], rest[n:]
        x2 = x.reshape(-1, x.shape[-1])
        ranks = [b.shape[1] for b in scaled]
        dy2s = [None if dy is None else dy.reshape(-1, dy.shape[-1]).to(x.dtype) for dy in dys]
        grads: list[torch.Tensor | None] = [None] * (2 * n)
        d_lows = []
        for i, (dy2, low_m, m) in enumerate(zip(dy2s, low.split(ranks, dim=1), ctx.members, strict=True)):
            need_b = ctx.needs_input_grad[4 + 2 * i]
            if dy2 is None:
                d_lows.append(low.new_zeros(low.shape[0], ranks[i]))
                d_b = low_m.new_zeros(scaled[i].shape, dtype=torch.float32) if need_b else None
            else:
                d_low_m, d_b = _output_grads(dy2, scaled[i], low_m, need_b)
                d_lows.append(d_low_m)
            if d_b is not None:
                grads[2 * i + 1] = d_b.mul_(m.scale) if m.scale != 1.0 else d_b
        d_low = d_lows[0] if n == 1 else torch.cat(d_lows, dim=1)
        if any(ctx.needs_input_grad[3::2]):
            for i, d_a in enumerate(_grad_mm(d_low.t(), x2).split(ranks)):
                grads[2 * i] = d_a
        dx = _input_grad(x, dy2s, d_low, stacked, kept, ctx) if ctx.needs_input_grad[0] else None
        return (dx, None, None, *grads)


def _two_products(dy2: torch.Tensor, b_scaled: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.mm(dy2, b_scaled), _grad_mm(dy2.t(), low)


# One read of dy for both products while the kernel works (`lora_grads`); two matmuls after it fails.
_BY_KERNEL = UntilItFails(
    lora_grads.grads_by_kernel, _two_products, "the LoRA gradient kernel", "two matmuls", lora_grads.log
)


def _output_grads(
    dy2: torch.Tensor, b_scaled: torch.Tensor, low: torch.Tensor, need_b: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The products of dy: dy (s B) in the compute dtype and, if `need_b`, dy^T (x A^T) in fp32 (unscaled)."""
    if not need_b:
        return torch.mm(dy2, b_scaled), None
    if dy2.is_cuda and lora_grads.fits(dy2, low):
        d_low, d_b = _BY_KERNEL(dy2, b_scaled, low)
        return d_low, d_b
    return _two_products(dy2, b_scaled, low)


def _project(
    x2: torch.Tensor, low: torch.Tensor, b_scaled: torch.Tensor, m: Member, q: Any, weight: torch.Tensor | None
) -> torch.Tensor:
    """One member's output [tokens, out] from the rank-r product `low` of its input."""
    bias = getattr(m.base, "bias", None)
    if _skipped_now(m):
        out_features = weight.shape[0] if weight is not None else q.data.shape[0]
        return x2.new_zeros(x2.shape[0], out_features)  # nothing reads it (recompute.py)
    if weight is None:
        y: torch.Tensor = q.forward(x2, x2.dtype)
        y.addmm_(low, b_scaled.t())
        if bias is not None:
            y.add_(bias.to(x2.dtype))
        return y
    # The rank-r product first, then the base matmul accumulates onto it in its epilogue: the
    # other order would read and write the whole [T, out] output once more.
    y = torch.mm(low, b_scaled.t()) if bias is None else torch.addmm(bias.to(x2.dtype), low, b_scaled.t())
    return y.addmm_(x2, weight.t())


def _skipped_now(m: Member) -> bool:
    """Whether this member's output goes unread in the recomputation running now (recompute.py)."""
    return bool(m.layer.__dict__.get("bp_output_unused_in_recompute")) and recompute.recomputing()


def _input_grad(
    x: torch.Tensor,
    dy2s: list[torch.Tensor | None],
    d_low: torch.Tensor,
    stacked: torch.Tensor,
    kept: list[torch.Tensor | None],
    ctx: Any,
) -> torch.Tensor:
    """The input gradient, the sum over members of dy W + (dy s B) A, accumulated in one tensor.

    The adapters' rank-r part is written first and the dense base products add onto it in
    their epilogues, so no [T, in] tensor is read and written again; FP8 products, which
    cannot accumulate, come first and the rank-r part adds onto them.
    """
    dx: torch.Tensor | None = None
    for dy2, q in zip(dy2s, ctx.fp8, strict=True):
        if dy2 is not None and q is not None:
            part = q.input_grad(dy2, x.dtype)
            dx = part if dx is None else dx.add_(part)
    if dx is None:
        dx = torch.mm(d_low, stacked)
    else:
        dx.addmm_(d_low, stacked)
    for dy2, q, weight, m in zip(dy2s, ctx.fp8, kept, ctx.members, strict=True):
        if dy2 is not None and q is None:
            dx.addmm_(dy2, weight if weight is not None else dense_weight(m.base, x.dtype))
    return dx.view_as(x)


def _member(layer: Any) -> Member:
    name = layer.active_adapters[0]
    return Member(layer, layer.get_base_layer(), float(layer.scaling[name]))


def _adapters(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    name = layer.active_adapters[0]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def lora_projections(x: torch.Tensor, layers: list[Any], owner: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """`base(x) + scale * x A^T B^T` of each LoRA layer in `layers`, as one fused op (see module doc).

    `owner` holds the adapters' compute-dtype copies for this set of layers.
    """
    adapters = [t for layer in layers for t in _adapters(layer)]
    out: tuple[torch.Tensor, ...] = _LoraProjections.apply(x, [_member(m) for m in layers], owner, *adapters)
    return out


class SharedInput:
    """LoRA layers of one module that read the same input (q, k and v; gate and up).

    The first of them to be called computes all of their outputs in one op: one rank-r product
    of the input for every adapter, and in backward one input gradient that every product
    accumulates into, where separate ops would each read the input and autograd would add
    their input gradients. It holds the others' outputs for their own calls, which the model
    makes right after with the same tensor; a sibling called with another tensor (or one changed
    in place since) computes alone.
    """

    def __init__(self, layers: list[Any]) -> None:
        self.layers = layers
        self.pending: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}
        self.copies: dict[str, Any] = {}

    def output(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        """`layer`'s output for `x`: held since a sibling's call, or computed now with its siblings'."""
        held = self.pending.pop(id(layer), None)
        if held is not None and held[0] is x and held[1] == _version(x):
            return held[2]
        if held is not None or not all(_fusable_now(m) for m in self.layers):
            return lora_projections(x, [layer], layer.__dict__)[0]
        outs = lora_projections(x, self.layers, self.copies)
        self.pending.clear()
        for m, y in zip(self.layers, outs, strict=True):
            if m is not layer:
                self.pending[id(m)] = (x, _version(x), y)
        return outs[self.layers.index(layer)]


def _version(x: torch.Tensor) -> int:
    """`x`'s version counter; inference tensors (`torch.inference_mode`) keep none."""
    return -1 if x.is_inference() else x._version


def _fusable_now(self: Any, *args: Any, **kwargs: Any) -> bool:
    """Whether this call of a LoRA layer takes the fused path (peft's own code runs the rest)."""
    adapters = self.active_adapters
    return not (
        args
        or kwargs
        or self.disable_adapters
        or self.merged
        or len(adapters) != 1
        or adapters[0] not in self.lora_A
        or adapters[0] in getattr(self, "lora_variant", {})
        or (self.training and not isinstance(self.lora_dropout[adapters[0]], torch.nn.Identity))
    )


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if not _fusable_now(self, *args, **kwargs):
        return self._peft_forward(x, *args, **kwargs)
    shared: SharedInput | None = self.__dict__.get("bp_shared_input")
    if shared is not None:
        return shared.output(self, x)
    return lora_projections(x, [self], self.__dict__)[0]


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


# Sibling projections that transformers' decoders call one after another on the same input.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def install(model: torch.nn.Module) -> int:
    """Routes every eligible LoRA layer of `model` through `lora_projections`; returns how many.

    Siblings of one module (`SIBLINGS`) that are all fused share one `SharedInput`.
    """
    count = 0
    for module in model.modules():
        if is_fusable(module) and not hasattr(module, "_peft_forward"):
            setattr(module, "_peft_forward", module.forward)  # noqa: B010 (not a declared attribute)
            setattr(module, "forward", types.MethodType(_fused_forward, module))  # noqa: B010
            count += 1
    for module in model.modules():
        for names in SIBLINGS:
            layers = [getattr(module, n, None) for n in names]
            if all(layer is not None and hasattr(layer, "_peft_forward") for layer in layers):
                shared = SharedInput(layers)
                for layer in layers:
                    layer.__dict__["bp_shared_input"] = shared
    return count
