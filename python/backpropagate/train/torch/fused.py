"""Fused element-wise kernels for the decoder: RMSNorm, SwiGLU, RoPE and the loss's softmax.

In eager PyTorch an RMSNorm is six kernels through fp32 copies of the activations, and
SwiGLU and RoPE are three or four each; at 8k tokens x 28 layers that memory traffic is
a tenth of a training step. `torch.compile` turns each of these small pure functions into
one fused kernel for forward and one for backward (on CUDA, through Triton), and keeps
only what backward needs. The functions are the same mathematics as transformers' own
modules, so the patched model computes what the original computes.

Patched only on CUDA and only for families whose modules match these formulas exactly
(Llama, Qwen2, Qwen3, Mistral); anything else keeps its original modules.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from backpropagate.log import get_logger
from backpropagate.train.torch import fp8, logprob_rows, losses
from backpropagate.train.torch.fast_path import UntilItFails

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")

log = get_logger("fused")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Transformers' RMSNorm: normalise in fp32, cast back, scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_rows(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q, k [batch, tokens, heads, dim] with cos, sin [batch, tokens, 1, dim]."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transformers' `apply_rotary_pos_emb` (full rotary dimension), computed token-major.

    q and k come as [batch, heads, tokens, dim] views of the projections' [tokens, heads x dim]
    outputs. The compiled kernel takes and returns them token-major, so its outputs, the
    gradients attention hands back for them (allocated like its inputs) and the gradients it
    hands on to the projections all keep the projections' layout. Head-major outputs cost two
    full copies of q's gradient and two of k's per layer in backward: one into the layout the
    compiled backward expects, one back for the projection.
    """
    heads_first = unsqueeze_dim == 1
    if heads_first:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    q, k = kernel("rope_rows")(q, k, cos.unsqueeze(2), sin.unsqueeze(2))
    return (q.transpose(1, 2), k.transpose(1, 2)) if heads_first else (q, k)


def _compiled(fn: Callable[..., Any], dynamic: bool | None = None) -> UntilItFails:
    """`fn` compiled on its first CUDA call, eager for good if compiling fails; CPU calls run it eager.

    By default static shapes first; a second shape (packed rows vary) recompiles once with a
    dynamic length. `dynamic=True` compiles every dimension symbolic from the start.
    """
    return UntilItFails(torch.compile(fn, dynamic=dynamic), fn, f"compiling {fn.__name__}", "eager kernels", log)


_KERNELS: dict[str, UntilItFails] = {}

# The loss's softmax by a Triton kernel in the fewest passes over the logits, while it works.
_BY_KERNEL = {
    "logprob_and_grad": logprob_rows.logprob_and_grad_by_kernel,
    "logprob_only": logprob_rows.logprob_only_by_kernel,
}


def kernel(name: str) -> UntilItFails:
    """The shared compiled version of one of this module's functions (the loss's softmax: `logprob_rows`' kernel first)."""
    if name not in _KERNELS:
        fns: dict[str, Callable[..., Any]] = {
            "rms_norm": rms_norm,
            "swiglu": swiglu,
            "rope_rows": rope_rows,
            "logprob_and_grad": losses._logprob_and_grad,
            "logprob_only": losses._logprob_only,
            "fp8_rows": fp8.rows_in_fp8,
            "fp8_blocks": fp8.blocks_in_fp8,
        }
        # FP8 rows and blocks come in a dozen widths (every projection's input and output gradient): one
        # graph for all of them, or the recompile limit sends the later ones to eager kernels.
        compiled = _compiled(fns[name], dynamic=True if name.startswith("fp8_") else None)
        fast = _BY_KERNEL.get(name) if logprob_rows.triton is not None else None
        _KERNELS[name] = (
            compiled
            if fast is None
            else UntilItFails(fast, compiled, "the log-prob row kernel", "compiled kernels", logprob_rows.log)
        )
    return _KERNELS[name]


def _norm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = kernel("rms_norm")(hidden_states, self.weight, self.variance_epsilon)
    return out


def _mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = self.down_proj(kernel("swiglu")(self.gate_proj(x), self.up_proj(x)))
    return out


def _is_standard_norm(module: torch.nn.Module) -> bool:
    name = type(module).__name__
    return (
        name.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and getattr(module, "weight", None) is not None
    )


def _is_swiglu_mlp(module: torch.nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return (
        all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
        and type(act).__name__ in ("SiLU", "SiLUActivation")
        and type(module).__name__.endswith("MLP")
    )


def model_family(model: torch.nn.Module) -> str | None:
    """The `model_type` of a transformers model (or of the model a peft wrapper holds)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def install(model: torch.nn.Module) -> list[str]:
    """Routes the loss's softmax, and RMSNorm, SwiGLU and RoPE of a supported family, through compiled kernels.

    Returns:
        What was patched.
    """
    losses.KERNELS["logprob_and_grad"] = kernel("logprob_and_grad")
    losses.KERNELS["logprob_only"] = kernel("logprob_only")
    patched = {"cross_entropy"}
    family = model_family(model)
    if family not in FAMILIES:
        return sorted(patched)
    for module in model.modules():
        if _is_standard_norm(module):
            setattr(module, "forward", types.MethodType(_norm_forward, module))  # noqa: B010
            patched.add("rms_norm")
        elif _is_swiglu_mlp(module):
            setattr(module, "forward", types.MethodType(_mlp_forward, module))  # noqa: B010
            patched.add("swiglu")
    modeling = sys.modules.get(f"transformers.models.{family}.modeling_{family}")
    if modeling is not None and hasattr(modeling, "apply_rotary_pos_emb"):
        rotary = getattr(model.config, "partial_rotary_factor", 1.0) in (None, 1.0)
        if rotary:
            setattr(modeling, "apply_rotary_pos_emb", rope)  # noqa: B010 (a module global)
            patched.add("rope")
    return sorted(patched)
