"""The decoder MLP computed in slices of the token dimension, forward and backward.

At long lengths the MLP's intermediate activations dominate one layer's memory: a gated
MLP holds gate, up and their product, three [tokens, intermediate] tensors (at 128k tokens
and an intermediate width of 14336, 11 GB in bf16), and its backward as many again. Here
the MLP runs `chunk` tokens at a time and saves only its input; backward recomputes one
slice's intermediates, backpropagates through it and moves on, so one slice's
intermediates exist at a time. The MLP is token-wise, so the result is the same as in
one piece (up to the summation order of the weight gradients over slices).

Only recomputed layers slice (`bp_sliced`, set by `recompute.RecomputePlan`): a layer that
keeps its activations has memory planned for its whole intermediates, and slicing it would
only add an MLP forward (about 40% of a kept layer's work at Llama's widths).

The recomputation costs one more MLP forward, except in the families of
`recompute.LAST_PROJECTION_UNUSED`: when the layer itself is being recomputed the MLP
output is never read, so the forward there is skipped altogether and the MLP still runs
twice per step, as it would unchunked.

Lengths up to `chunk` run the original forward untouched.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from backpropagate.train.torch import recompute

# Tokens per slice: 8k tokens of a 14336-wide MLP are 0.23 GB per intermediate in bf16, and their
# matmuls still run at full speed (dequantizing a slice's 4-bit weights costs ~1% of them). Micro-batches
# up to this length (4 x 2048, the speed benchmarks') run unsliced, CUDA graphs included.
CHUNK_TOKENS = 8192


class _ChunkedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mlp: Any, chunk: int, *params: torch.Tensor) -> torch.Tensor:
        ctx.mlp, ctx.chunk = mlp, chunk
        ctx.save_for_backward(x)
        if mlp.__dict__.get("bp_output_unused_in_recompute") and recompute.recomputing():
            return torch.zeros_like(x)  # nothing reads it (recompute.py)
        return _sliced(mlp, x, chunk)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        for s in range(0, x.shape[-2], ctx.chunk):
            with torch.enable_grad():
                piece = x[..., s : s + ctx.chunk, :].detach().requires_grad_(dx is not None)
                out = ctx.mlp.bp_unchunked_forward(piece)
            # Trainable weights get their gradient accumulated here, slice by slice.
            torch.autograd.backward(out, grad[..., s : s + ctx.chunk, :])
            if dx is not None:
                assert piece.grad is not None
                dx[..., s : s + ctx.chunk, :] = piece.grad
        return (dx, None, None) + (None,) * (len(ctx.needs_input_grad) - 3)


def _sliced(mlp: Any, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """The MLP's output, computed `chunk` tokens at a time (no graph: under no_grad or inside a Function)."""
    out = torch.empty_like(x)
    for s in range(0, x.shape[-2], chunk):
        out[..., s : s + chunk, :] = mlp.bp_unchunked_forward(x[..., s : s + chunk, :])
    return out


def _chunked_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    long = x.shape[-2] > self.bp_chunk_tokens
    if long and not torch.is_grad_enabled():  # evaluation at long lengths
        return _sliced(self, x, self.bp_chunk_tokens)
    if not (long and self.bp_sliced):  # short, or a layer that keeps its activations
        out: torch.Tensor = self.bp_unchunked_forward(x)
        return out
    # Trainable weights are inputs, so the output needs a gradient even where `x` does not.
    params = [p for p in self.parameters() if p.requires_grad]
    out = _ChunkedMLP.apply(x, self, self.bp_chunk_tokens, *params)
    return out


def is_gated_mlp(module: torch.nn.Module) -> bool:
    """A decoder MLP of gate, up and down projections, applied token by token."""
    return type(module).__name__.endswith("MLP") and all(
        hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")
    )


def install(mlp: torch.nn.Module, chunk: int | None = None) -> None:
    """Makes `mlp` run in slices of `chunk` (default `CHUNK_TOKENS`) tokens when given more (idempotent)."""
    mlp.__dict__["bp_chunk_tokens"] = chunk or CHUNK_TOKENS
    mlp.__dict__.setdefault("bp_sliced", True)
    if "bp_unchunked_forward" not in mlp.__dict__:
        mlp.__dict__["bp_unchunked_forward"] = mlp.forward
        mlp.forward = types.MethodType(_chunked_forward, mlp)
