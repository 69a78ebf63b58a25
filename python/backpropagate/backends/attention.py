"""Padding-free attention: packed samples attend only to themselves.

A packed micro-batch is one row of many samples back to back. `cu_seqlens` marks where
each sample starts; attention must be causal *within* a sample and blind across them.
The function registered here with transformers' `AttentionInterface` reads the sample
boundaries from the standard flash-attention keyword arguments (`cu_seq_lens_q`,
`max_length_q`, ...) that the model forward passes down to every attention layer:

* CUDA: `torch.nn.attention.varlen.varlen_attn` (flash attention over variable-length
  samples, no padding, no mask); where it is missing, `flex_attention` with a document mask.
* CPU: SDPA with a block-diagonal causal mask (built once per forward, shared by layers).

Without sample boundaries (generation, plain evaluation) it defers to transformers' SDPA.

Tokens shared by several samples (the common prompt of a preference pair) can be stored
once: `expand_kwargs` gives an index that gathers queries, keys and values back into
whole samples for attention, and one that picks each stored token's output. Everything
outside attention (projections, MLP, norms) then runs once per stored token.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "backpropagate_packed"
# Keyword arguments carrying a shared-token layout down to attention (see `expand_kwargs`).
EXPAND_INDEX = "packed_expand_index"
KEEP_INDEX = "packed_keep_index"


class _PerForwardCache:
    """Keeps one value per `cu_seqlens` tensor: every layer of a forward (and its recompute) shares it.

    Holding a reference to the key tensor means its id cannot be reused while cached.
    """

    def __init__(self) -> None:
        self._key: torch.Tensor | None = None
        self._extra: tuple[Any, ...] = ()
        self._value: Any = None

    def get(self, cu_seqlens: torch.Tensor, extra: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        if self._key is not cu_seqlens or self._extra != extra:
            self._value = build()
            self._key, self._extra = cu_seqlens, extra
        return self._value


_mask_cache = _PerForwardCache()


def block_causal_mask(cu_seqlens: torch.Tensor, total: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean [total, total] mask: True where query i may attend key j (same sample, j <= i, in window)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=device, dtype=torch.long)
    sample = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths, output_size=total)
    pos = torch.arange(total, device=device)
    mask = (sample[:, None] == sample[None, :]) & (pos[None, :] <= pos[:, None])
    if window is not None:
        mask &= pos[:, None] - pos[None, :] < window
    return mask


def _sdpa_block_causal(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scaling: float | None,
    window: int | None,
) -> torch.Tensor:
    total = query.shape[2]
    mask = _mask_cache.get(
        cu_seqlens,
        ("dense", total, window, query.device),
        lambda: block_causal_mask(cu_seqlens, total, window, query.device),
    )
    gqa = query.shape[1] != key.shape[1]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2)


def _varlen_signature() -> inspect.Signature | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return inspect.signature(varlen_attn)


_VARLEN = _varlen_signature()


def varlen_supported(scaling: float | None, head_dim: int, window: int | None) -> bool:
    """Whether `varlen_attn` of this torch can compute this layer's attention exactly."""
    if _VARLEN is None:
        return False
    params = _VARLEN.parameters
    if window is not None and "window_size" not in params:
        return False
    return scaling is None or "scale" in params or abs(scaling - head_dim**-0.5) < 1e-12


def _varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_len: int,
    scaling: float | None,
    window: int | None,
) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    assert _VARLEN is not None
    params = _VARLEN.parameters
    # [1, heads, T, dim] -> [T, heads, dim], the layout varlen kernels take.
    q = query[0].transpose(0, 1).contiguous()
    k = key[0].transpose(0, 1).contiguous()
    v = value[0].transpose(0, 1).contiguous()
    kwargs: dict[str, Any] = {}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
    if "window_size" in params:
        kwargs["window_size"] = (-1 if window is None else window - 1, 0)
    else:
        kwargs["is_causal"] = True
    if scaling is not None and "scale" in params:
        kwargs["scale"] = scaling
    out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **kwargs)
    assert isinstance(out, torch.Tensor)  # a tuple only when auxiliary outputs are requested
    return out.unsqueeze(0)


_flex_cache = _PerForwardCache()
_compiled_flex: Callable[..., torch.Tensor] | None = None


def _flex(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scaling: float | None,
    window: int | None,
) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    total = query.shape[2]

    def build() -> Any:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        doc = torch.repeat_interleave(torch.arange(len(lengths), device=query.device), lengths, output_size=total)

        def document_causal(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            keep = (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)
            if window is not None:
                keep = keep & (q_idx - kv_idx < window)
            return keep

        return create_block_mask(document_causal, 1, None, total, total, device=query.device)

    block_mask = _flex_cache.get(cu_seqlens, ("flex", total, window), build)
    gqa = query.shape[1] != key.shape[1]
    out = _compiled_flex(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2)


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over packed samples; the signature transformers calls attention functions with.

    Args:
        module: The attention layer (read for its sliding window).
        query: [1, heads, T, dim] after RoPE.
        key: [1, kv_heads, T, dim].
        value: [1, kv_heads, T, dim].
        attention_mask: Ignored when sample boundaries are given (none is built for packed rows).
        scaling: Softmax scale.
        dropout: Attention dropout; must be 0 for packed rows.
        **kwargs: `cu_seq_lens_q` / `max_length_q` carry the boundaries; `EXPAND_INDEX` /
            `KEEP_INDEX` a shared-token layout (boundaries are then those of the expanded order).

    Returns:
        ([1, T, heads, dim] output, None).
    """
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError("packed attention takes one row of concatenated samples")
    if dropout:
        raise ValueError("attention dropout is not supported on packed rows")
    window = kwargs.get("sliding_window") or None
    expand = kwargs.get(EXPAND_INDEX)
    if expand is not None:
        query, key, value = (t.index_select(2, expand) for t in (query, key, value))
    if query.is_cuda:
        if varlen_supported(scaling, query.shape[-1], window):
            out = _varlen(query, key, value, cu_seqlens, int(kwargs["max_length_q"]), scaling, window)
        else:
            out = _flex(query, key, value, cu_seqlens, scaling, window)
    else:
        out = _sdpa_block_causal(query, key, value, cu_seqlens, scaling, window)
    if expand is not None:
        out = out.index_select(1, kwargs[KEEP_INDEX])
    return out, None


def register() -> None:
    """Makes `PACKED_ATTENTION` a valid `attn_implementation` name (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)


@contextmanager
def packed_attention(model: torch.nn.Module) -> Iterator[None]:
    """Switches `model` (and its sub-configs) to packed attention for the duration of training."""
    register()
    configs = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    unique = list({id(c): c for c in configs}.values())
    saved = [c._attn_implementation for c in unique]
    for c in unique:
        c._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        for c, name in zip(unique, saved, strict=True):
            c._attn_implementation = name


def packed_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int) -> dict[str, Any]:
    """The keyword arguments a model forward passes down to attention for a packed row."""
    return {
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": max_seqlen,
        "max_length_k": max_seqlen,
    }


def expand_kwargs(expand_index: torch.Tensor, keep_index: torch.Tensor) -> dict[str, Any]:
    """Keyword arguments for a row whose shared tokens are stored once.

    Args:
        expand_index: [T'] stored position of each token in attention order (samples whole).
        keep_index: [T] position in attention order whose output each stored token takes.
    """
    return {EXPAND_INDEX: expand_index, KEEP_INDEX: keep_index}
