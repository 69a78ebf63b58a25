"""Wide base weights stored beside their adapters' B, so that one matmul does base and adapter.

`lora_fused` adds the adapter's part to a base product through the matmul's epilogue: the
rank-r part is written as a whole [tokens, out] tensor first and the base matmul reads it
back. Where the outputs are much wider than the input (gate and up: 2 x 18,944 against 3,584
in a 7B) that write and read cost more than copying the input. A concatenation along the
contracted dimension then does both in one product:

    y_i = [x | x A^T] [W_i | 0 .. s B_i .. 0]^T      (each W_i a view of its [out_i, in + R] buffer)

It serves groups of layers reading one input (`lora_fused.SharedInput`, or one layer alone)
whose outputs add up to at least `WIDE` times the input. The base weight moves into its
buffer once, so memory does not grow; a member's s B columns are rewritten whenever
`lora_fused` remakes its compute-dtype copies, once per optimizer step. Padding columns (to
`ALIGN` elements) are zero in the weight and in the input. On an H100, the gate and up
products of a 7B at 8,192 tokens take 3.26 ms this way against 3.42 (the base products
alone: 3.13; `benches/lora_concat_gpu.py`). The input gradients keep `lora_fused`'s order
(rank-r part first): the same trick for the down-projection's, copying dy into [dy | dy s B],
measured slower on an H200 (1.85 ms against 1.79).

Only dense base weights take the layout (not 4-bit, not FP8, not FSDP-sharded ones), and only
calls in the weight's dtype use it; anything else runs `lora_fused`'s own products.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from backpropagate.train.torch import fp8

# How many times wider than the input the outputs of a group must be together.
WIDE = 2
# Contracted dimensions padded to this many elements (16 bytes in 16-bit, as cuBLAS prefers).
ALIGN = 8


@dataclass
class Wide:
    """Members reading one input, each weight a view of [out, in + R] whose extra columns hold s B."""

    buffers: list[torch.Tensor]  # per member [out_i, in + R], zero outside W and its own s B
    offsets: list[int]  # per member, the first column of its s B after the input's `in` columns
    in_features: int
    ranks: int  # R, the stacked ranks (the columns of x A^T)

    @classmethod
    def around(cls, weights: list[torch.Tensor], ranks: list[int]) -> Wide:
        """Buffers holding copies of `weights` ([out_i, in], one input) and zero columns for each member's s B."""
        k = weights[0].shape[1]
        width = -(-(k + sum(ranks)) // ALIGN) * ALIGN
        buffers = []
        for w in weights:
            buffer = w.new_zeros(w.shape[0], width)
            buffer[:, :k].copy_(w)
            buffers.append(buffer)
        return cls(buffers, [sum(ranks[:i]) for i in range(len(ranks))], k, sum(ranks))

    def load(self, scaled: list[torch.Tensor]) -> None:
        """Writes each member's s B (of `lora_fused`'s compute-dtype copies) into its columns."""
        k = self.in_features
        for buffer, offset, b in zip(self.buffers, self.offsets, scaled, strict=True):
            buffer[:, k + offset : k + offset + b.shape[1]].copy_(b)

    def serves(self, x2: torch.Tensor) -> bool:
        """Whether a call with input `x2` can use the buffers (same dtype and device; else `lora_fused`'s products)."""
        return x2.dtype == self.buffers[0].dtype and x2.device == self.buffers[0].device

    def project(self, x2: torch.Tensor, low: torch.Tensor, biases: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """Every member's x W^T + b + (x A^T)(s B)^T, one matmul each over [x | x A^T]."""
        pad = self.buffers[0].shape[1] - self.in_features - self.ranks
        parts = [x2, low] if pad == 0 else [x2, low, low.new_zeros(low.shape[0], pad)]
        joined = torch.cat(parts, dim=1)  # a vectorized copy; a strided copy into a buffer ran 2.5x slower
        return [
            torch.mm(joined, w.t()) if b is None else torch.addmm(b.to(x2.dtype), joined, w.t())
            for w, b in zip(self.buffers, biases, strict=True)
        ]


def _dense_weight(layer: Any) -> torch.Tensor | None:
    """The base layer's plain weight (not 4-bit, not FP8), or None."""
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    if weight is None or getattr(weight, "quant_state", None) is not None or fp8.of(base) is not None:
        return None
    return weight


def _rank(layer: Any) -> int:
    return int(layer.lora_A[layer.active_adapters[0]].weight.shape[0])


def wide(layers: list[Any]) -> Wide | None:
    """Moves the weights of `layers` (one input) into a wide layout if their outputs are `WIDE` times the input."""
    weights = [_dense_weight(layer) for layer in layers]
    if any(w is None for w in weights) or len({(w.dtype, w.device) for w in weights if w is not None}) != 1:
        return None
    dense = [w for w in weights if w is not None]
    k = dense[0].shape[1]
    if sum(w.shape[0] for w in dense) < WIDE * k:
        return None
    with torch.no_grad():
        layout = Wide.around(dense, [_rank(layer) for layer in layers])
        for w, buffer in zip(dense, layout.buffers, strict=True):
            w.data = buffer[:, :k]  # the weight moves: its old storage is freed
    return layout


def install(model: torch.nn.Module) -> int:
    """Gives every fused LoRA layer group of `model` that is wide enough the wide layout; returns how many.

    A group is the layers of one `SharedInput`, or one layer alone. Its layout lives beside
    its compute-dtype adapter copies, which are dropped so the next call remakes and loads them.
    """
    count = 0
    seen: set[int] = set()
    for module in model.modules():
        if "_peft_forward" not in module.__dict__ or id(module) in seen:
            continue
        shared = module.__dict__.get("bp_shared_input")
        layers, owner = (shared.layers, shared.copies) if shared is not None else ([module], module.__dict__)
        seen.update(id(layer) for layer in layers)
        layout = wide(layers)
        if layout is not None:
            owner["bp_wide"] = layout
            owner.pop("_bp_copies", None)
            count += 1
    return count
