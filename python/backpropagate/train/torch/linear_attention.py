"""Linear-attention layers (Qwen3.5's Gated DeltaNet) over packed rows: state reset at every sample start.

A Gated DeltaNet layer carries a recurrent state, and a short causal convolution, from token
to token; in a packed row both would flow from one sample into the next. transformers' layer
takes no sample boundaries (its convolution ignores them, and its torch delta rule refuses
them), so while packed attention is on, the layer runs here instead, on the whole row at once:

* projections, gate, norm and output projection run once per stored token, as in the layer;
* the convolution is the row's convolution with each tap masked where it would reach back
  into the previous sample (`segment_conv`): exact, one pass over the row;
* the delta rule runs over the row's `cu_seqlens` in flash-linear-attention's varlen kernel
  on CUDA (one launch for all samples), and elsewhere (without that library, or with a
  Triton whose kernels it refuses on this GPU) as transformers' chunked torch rule over each
  sample's slice.

With a shared-token layout (a preference pair's prompt stored once), a sample's stored
tokens are only its tail: its whole sequence is gathered by `kv_index` for the convolution
and the delta rule, and each stored token reads its output at its place in that sequence.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from backpropagate.errors import InputError
from backpropagate.train.torch.attention import KV_INDEX, segment_frames

# The parts of transformers' Qwen3.5 Gated DeltaNet layer that the packed forward uses.
_LAYOUT = (
    *("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "conv1d", "norm", "out_proj", "A_log", "dt_bias"),
    *("activation", "key_dim", "value_dim", "head_k_dim", "head_v_dim"),
)


def linear_attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's recurrent token mixers (Gated DeltaNet layers), if any."""
    return [m for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet")]


# flash-linear-attention refuses the gated delta rule's backward on Hopper with Triton 3.4.0 to
# 3.7.0, whose compiler gets one of its kernels wrong there.
_HOPPER_BAD_TRITON = ((3, 4, 0), (3, 7, 1))


@functools.cache
def varlen_kernel_available(device: torch.device) -> bool:
    """Whether the delta rule runs as one varlen kernel over a packed row on `device` (forward and backward)."""
    if device.type != "cuda" or importlib.util.find_spec("fla") is None:
        return False
    import triton

    version = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:3])
    hopper = torch.cuda.get_device_capability(device)[0] == 9
    return not (hopper and _HOPPER_BAD_TRITON[0] <= version < _HOPPER_BAD_TRITON[1])


def segment_conv(x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Depthwise causal convolution over a packed row that never reaches across a sample start.

    Args:
        x: [1, T, C] the row, token-major.
        weight: [C, 1, K] the convolution's weights (tap K - 1 reads the current token).
        positions: [T] each token's position within its sample.
    """
    taps, dtype = weight.shape[-1], x.dtype
    w, x = weight.squeeze(1), x.to(weight.dtype)  # in the weights' precision, as transformers' convolution
    out = x * w[:, taps - 1]
    for back in range(1, taps):
        earlier = F.pad(x, (0, 0, back, 0))[:, : x.shape[1]]
        reach = (positions >= back).to(x.dtype)[None, :, None]
        out = out + earlier * (w[:, taps - 1 - back] * reach)
    return out.to(dtype)


def _delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, cu: torch.Tensor
) -> torch.Tensor:
    """The gated delta rule (q and k L2-normalized, state zero at each sample start) over a packed row."""
    if varlen_kernel_available(q.device):
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        out, _ = chunk_gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True, cu_seqlens=cu.long())
        return out
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    # transformers routes its rule to flash-linear-attention where installed: the torch rule is the one it wraps.
    torch_rule = inspect.unwrap(torch_chunk_gated_delta_rule)
    if k.shape[2] != v.shape[2]:  # each q/k head serves consecutive value heads; older rules want them equal
        q, k = (t.repeat_interleave(v.shape[2] // k.shape[2], dim=2) for t in (q, k))
    bounds = cu.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end > start:
            part = (t[:, start:end] for t in (q, k, v, g, beta))
            out, _ = torch_rule(*part, use_qk_l2norm_in_kernel=True)
            outs.append(out)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def packed_forward(layer: Any, hidden_states: torch.Tensor, cu_q: torch.Tensor, **packed: Any) -> torch.Tensor:
    """The layer's forward over a packed row [1, T, hidden], each sample's state starting from zero."""
    kv_index = packed.get(KV_INDEX)
    # Sample boundaries in the frame the recurrence runs over (the gathered sequences under kv_index).
    cu_k: torch.Tensor = packed["cu_seq_lens_k"] if kv_index is not None else cu_q
    total = hidden_states.shape[1]
    mixed = layer.in_proj_qkv(hidden_states)
    a, b = layer.in_proj_a(hidden_states), layer.in_proj_b(hidden_states)
    if kv_index is not None:
        mixed, a, b = (t.index_select(1, kv_index) for t in (mixed, a, b))
    length = mixed.shape[1]
    # Each stored token's sample and place in its whole sequence; each gathered token's place in its sample.
    sample_q, pos_q, _, pos_k = segment_frames(cu_q, cu_k, total, length, mixed.device)
    mixed = ACT2FN[layer.activation](segment_conv(mixed, layer.conv1d.weight, pos_k))
    key_dim, head_k, head_v = layer.key_dim, layer.head_k_dim, layer.head_v_dim
    query, key, value = torch.split(mixed, [key_dim, key_dim, layer.value_dim], dim=-1)
    core = _delta_rule(
        query.reshape(1, length, -1, head_k),
        key.reshape(1, length, -1, head_k),
        value.reshape(1, length, -1, head_v),
        -layer.A_log.float().exp() * F.softplus(a.float() + layer.dt_bias),
        b.sigmoid(),
        cu_k,
    )
    if kv_index is not None:
        core = core.index_select(1, cu_k.to(torch.long)[sample_q] + pos_q)  # a segment is its sample's tail
    z = layer.in_proj_z(hidden_states)
    normed = layer.norm(core.reshape(-1, head_v), z.reshape(-1, head_v)).reshape(1, total, -1)
    return layer.out_proj(normed)


def _on_packed_rows(layer: torch.nn.Module, forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        cu_q = kwargs.get("cu_seq_lens_q")
        if cu_q is None:
            return forward(hidden_states=hidden_states, **kwargs)
        return packed_forward(layer, hidden_states, cu_q, **kwargs)

    return run


def _check_layout(layer: torch.nn.Module) -> None:
    missing = [name for name in _LAYOUT if not hasattr(layer, name)]
    if missing or type(layer.conv1d) is not torch.nn.Conv1d or layer.conv1d.bias is not None:
        raise InputError(
            "INPUT_UNSUPPORTED_ARCHITECTURE",
            f"training {type(layer).__name__} layers on packed rows is not supported: only Qwen3.5's "
            "Gated DeltaNet layout is (projections in_proj_qkv/z/a/b and a bias-free convolution)",
            hint="Use a model family listed under 'Model families' in the README.",
        )


@contextmanager
def packed_linear_attention(model: torch.nn.Module) -> Iterator[None]:
    """Runs every linear-attention layer of `model` with sample boundaries on packed rows, for the duration."""
    layers = linear_attention_layers(model)
    for layer in layers:
        _check_layout(layer)
    saved = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        setattr(layer, "forward", _on_packed_rows(layer, layer.forward))  # noqa: B010
    try:
        yield
    finally:
        for layer, forward in zip(layers, saved, strict=True):
            if forward is None:
                del layer.forward
            else:
                setattr(layer, "forward", forward)  # noqa: B010
