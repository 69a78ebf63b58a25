"""Padding-free attention: packed samples attend only to themselves.

A packed micro-batch is one row of many samples back to back. `cu_seqlens` marks where
each sample starts; attention must be causal *within* a sample and blind across them.
The function registered here with transformers' `AttentionInterface` reads the sample
boundaries from the standard flash-attention keyword arguments (`cu_seq_lens_q`,
`max_length_q`, ...) that the model forward passes down to every attention layer:

* CUDA: `torch.nn.attention.varlen.varlen_attn` (flash attention over variable-length
  samples, no padding, no mask); where it is missing, `flex_attention` with a document mask.
  A row whose samples all have one length (one sample: long contexts; fixed-length chunks)
  runs on cuDNN's faster kernel instead, as a batch of equal rows, where
  `cudnn_attention.check` verified it for the model (Hopper and newer, no sliding window).
* CPU: causal SDPA over each sample's slice of the row (no mask, and only the lower
  triangle of each sample computed); where a shared-token layout or a sliding window is
  in play, SDPA with a block-diagonal causal mask (built once per forward, shared by layers).
* Soft-capped scores (Gemma 2: `cap * tanh(score / cap)` before the softmax), which neither
  flash attention nor SDPA computes: the scores written out under the block mask, on every
  device (flex attention with the cap as score modifier fails to compile on torch 2.11, and a
  compile failure in one layer would leave its recomputation on another kernel).

Without sample boundaries (generation, plain evaluation) it defers to transformers' SDPA, or
for soft-capped layers computes the capped scores under a causal mask itself.

Tokens shared by several samples (the common prompt of a preference pair) can be stored
once: queries then run in stored order, each sample's segment holding only its own tokens
(the rest of a sample, its shared prefix, is stored with another sample), while keys and
values are gathered (`kv_index`) so that each sample sees its whole prefix. The causal
diagonal is aligned to the end of each key segment, so a query attends exactly the keys
it would see in its sample alone. Everything outside attention (projections, MLP, norms)
runs once per stored token.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from backpropagate.errors import RunFailedError
from backpropagate.train.torch import cudnn_attention

PACKED_ATTENTION = "backpropagate_packed"
# Keyword argument carrying the key gather of a shared-token layout down to attention.
KV_INDEX = "packed_kv_index"
# Keyword argument saying the row holds this many samples of one length and nothing else (`count_equal_rows`).
EQUAL_ROWS = "packed_equal_rows"


class _PerForwardCache:
    """Keeps one value per pair of boundary tensors: every layer of a forward (and its recompute) shares it.

    Holding references to the key tensors means their ids cannot be reused while cached.
    """

    def __init__(self) -> None:
        self._keys: tuple[torch.Tensor, ...] = ()
        self._extra: tuple[Any, ...] = ()
        self._value: Any = None

    def get(self, keys: tuple[torch.Tensor, ...], extra: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        same = len(keys) == len(self._keys) and all(a is b for a, b in zip(keys, self._keys, strict=True))
        if not same or self._extra != extra:
            self._value = build()
            self._keys, self._extra = keys, extra
        return self._value


_mask_cache = _PerForwardCache()


def segment_frames(
    cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, total_k: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """(sample, position) of every query and every key, positions counted in the key frame.

    A query segment shorter than its key segment holds the segment's last tokens (the
    causal diagonal is aligned bottom-right), so its positions start at len_k - len_q.
    """
    cu_q = cu_q.to(device=device, dtype=torch.long)
    cu_k = cu_k.to(device=device, dtype=torch.long)
    len_q, len_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    samples = torch.arange(len(len_q), device=device)
    sample_q = torch.repeat_interleave(samples, len_q, output_size=total_q)
    sample_k = torch.repeat_interleave(samples, len_k, output_size=total_k)
    pos_q = torch.arange(total_q, device=device) - cu_q[sample_q] + (len_k - len_q)[sample_q]
    pos_k = torch.arange(total_k, device=device) - cu_k[sample_k]
    return sample_q, pos_q, sample_k, pos_k


def block_causal_mask(
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    total_q: int,
    total_k: int,
    window: int | None,
    device: torch.device,
) -> torch.Tensor:
    """Boolean [total_q, total_k] mask: True where a query may attend a key (same sample, causal, in window)."""
    sample_q, pos_q, sample_k, pos_k = segment_frames(cu_q, cu_k, total_q, total_k, device)
    mask = (sample_q[:, None] == sample_k[None, :]) & (pos_k[None, :] <= pos_q[:, None])
    if window is not None:
        mask &= pos_q[:, None] - pos_k[None, :] < window
    return mask


def _shared_block_mask(
    cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, total_k: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """`block_causal_mask`, built once per forward and shared by its layers."""
    return _mask_cache.get(
        (cu_q, cu_k),
        ("dense", total_q, total_k, window, device),
        lambda: block_causal_mask(cu_q, cu_k, total_q, total_k, window, device),
    )


def _sdpa_block_causal(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    scaling: float | None,
    window: int | None,
) -> torch.Tensor:
    mask = _shared_block_mask(cu_q, cu_k, query.shape[2], key.shape[2], window, query.device)
    gqa = query.shape[1] != key.shape[1]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2)


def _soft_capped(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float | None,
    softcap: float,
) -> torch.Tensor:
    """Attention with soft-capped scores where `mask` is True, in fp32: [batch, T, heads, dim].

    It forms the [heads, T, T] scores (no fused kernel caps them; see the module doc).
    """
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1).float(), value.repeat_interleave(groups, dim=1).float()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.tanh(query.float() @ key.transpose(-1, -2) * (scale / softcap)) * softcap
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (probs @ value).to(query.dtype).transpose(1, 2)


def _causal_mask(
    attention_mask: torch.Tensor | None, total_q: int, total_k: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """Where rows without sample boundaries attend: each row one sample, unless a mask is given."""
    if attention_mask is not None:
        return attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    one_q, one_k = (torch.tensor([0, n], device=device) for n in (total_q, total_k))
    return block_causal_mask(one_q, one_k, total_q, total_k, window, device)


def _sdpa_per_sample(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """Causal SDPA on each sample's own part of the row, concatenated back: [1, T, heads, dim].

    The row is cut with `split`, whose backward concatenates the samples' gradients once;
    slicing it instead would zero-fill a whole-row gradient per sample and add them all up.
    bf16 inputs are attended in fp32: the CPU's bf16 SDPA forward and backward take about
    twice the time of fp32's at these sizes, and the casts cost little next to them.
    """
    dtype = query.dtype
    if dtype == torch.bfloat16:
        query, key, value = query.float(), key.float(), value.float()
    lengths = _mask_cache.get((cu,), ("lengths",), lambda: torch.diff(cu).tolist())
    gqa = query.shape[1] != key.shape[1]
    parts = zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True)
    outs = [
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        for q, k, v in parts
        if q.shape[2]
    ]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).to(dtype)


@functools.cache
def _varlen_signature() -> inspect.Signature | None:
    """`varlen_attn`'s parameters (None without it), read on first use.

    Importing it pulls in torch's compiler stack (~150 MB of RSS), which the CPU and MLX rails never need.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return inspect.signature(varlen_attn)


def varlen_supported(scaling: float | None, head_dim: int, window: int | None) -> bool:
    """Whether `varlen_attn` of this torch can compute this layer's attention exactly."""
    signature = _varlen_signature()
    if signature is None:
        return False
    params = signature.parameters
    if window is not None and "window_size" not in params:
        return False
    return scaling is None or "scale" in params or abs(scaling - head_dim**-0.5) < 1e-12


def _varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_index: torch.Tensor | None,
    bounds: tuple[torch.Tensor, torch.Tensor, int, int],
    scaling: float | None,
    window: int | None,
) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    signature = _varlen_signature()
    assert signature is not None
    params = signature.parameters
    cu_q, cu_k, max_q, max_k = bounds
    # [1, heads, T, dim] -> [T, heads, dim], the layout varlen kernels take; keys gathered in the same pass.
    # squeeze, not [0], whose backward would write each gradient into a zero tensor (cudnn_attention).
    q = query.squeeze(0).transpose(0, 1).contiguous()
    k, v = (t.squeeze(0).transpose(0, 1) for t in (key, value))
    if kv_index is None:
        k, v = k.contiguous(), v.contiguous()
    else:
        k, v = k.index_select(0, kv_index), v.index_select(0, kv_index)
    kwargs: dict[str, Any] = {}
    # Grouped-query attention runs natively in the flash kernel: keys and values are never repeated.
    if q.shape[1] != k.shape[1] and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    if "window_size" in params:
        kwargs["window_size"] = (-1 if window is None else window - 1, 0)
    else:
        kwargs["is_causal"] = True
    if scaling is not None and "scale" in params:
        kwargs["scale"] = scaling
    out = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    assert isinstance(out, torch.Tensor)  # a tuple only when auxiliary outputs are requested
    return out.unsqueeze(0)


_flex_cache = _PerForwardCache()
_compiled_flex: Callable[..., torch.Tensor] | None = None
# Why compiling flex attention failed in this process, once it has: later calls would run it uncompiled.
_flex_failure: str | None = None


def _flex(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    scaling: float | None,
    window: int | None,
) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _compiled_flex, _flex_failure
    if _flex_failure is not None:
        raise _flex_error(_flex_failure)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    total_q, total_k = query.shape[2], key.shape[2]

    def build() -> Any:
        sample_q, pos_q, sample_k, pos_k = segment_frames(cu_q, cu_k, total_q, total_k, query.device)

        def document_causal(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            keep = (sample_q[q_idx] == sample_k[kv_idx]) & (pos_k[kv_idx] <= pos_q[q_idx])
            if window is not None:
                keep = keep & (pos_q[q_idx] - pos_k[kv_idx] < window)
            return keep

        return create_block_mask(document_causal, 1, None, total_q, total_k, device=query.device)

    block_mask = _flex_cache.get((cu_q, cu_k), ("flex", total_q, total_k, window), build)
    gqa = query.shape[1] != key.shape[1]
    try:
        out = _compiled_flex(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=gqa)
    except torch.OutOfMemoryError:
        raise  # the loop's recovery handles it
    except Exception as exc:
        _flex_failure = f"{type(exc).__name__}: {str(exc)[:300]}"
        raise _flex_error(_flex_failure) from exc
    return out.transpose(1, 2)


def _flex_error(failure: str) -> RunFailedError:
    """The coded error for a flex attention that did not compile.

    After a failed compile, torch runs flex attention uncompiled, which saves other tensors than
    the compiled kernel: a layer recomputed on it no longer matches its forward (`CheckpointError`)
    and an uncompiled flex writes out every score. So every later call refuses too.
    """
    return RunFailedError(
        "RUNTIME_KERNEL_COMPILE_FAILED",
        f"flex attention (sliding-window or shared-prompt layers on CUDA) failed to compile: {failure}",
    )


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
        module: The attention layer.
        query: [1, heads, T, dim] after RoPE.
        key: [1, kv_heads, T, dim].
        value: [1, kv_heads, T, dim].
        attention_mask: Ignored when sample boundaries are given (none is built for packed rows).
        scaling: Softmax scale.
        dropout: Attention dropout; must be 0 for packed rows.
        **kwargs: `cu_seq_lens_q` / `max_length_q` carry the query boundaries, `cu_seq_lens_k` /
            `max_length_k` the key boundaries, `KV_INDEX` the key gather of a shared-token layout
            and `EQUAL_ROWS` how many samples of one length fill the row, where they do (`count_equal_rows`);
            `sliding_window` and `softcap` come from the layer.

    Returns:
        ([1, T, heads, dim] output, None).
    """
    cu_q = kwargs.get("cu_seq_lens_q")
    window = kwargs.get("sliding_window") or None
    softcap = kwargs.get("softcap") or None
    if cu_q is None and softcap is not None:  # SDPA cannot cap; transformers leaves causality to us
        mask = _causal_mask(attention_mask, query.shape[2], key.shape[2], window, query.device)
        return _soft_capped(query, key, value, mask, scaling, float(softcap)), None
    if cu_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError("packed attention takes one row of concatenated samples")
    if dropout:
        raise ValueError("attention dropout is not supported on packed rows")
    kv_index = kwargs.get(KV_INDEX)
    cu_k = kwargs.get("cu_seq_lens_k")
    cu_k = cu_q if cu_k is None else cu_k
    if softcap is not None:
        if kv_index is not None:
            key, value = key.index_select(2, kv_index), value.index_select(2, kv_index)
        mask = _shared_block_mask(cu_q, cu_k, query.shape[2], key.shape[2], window, query.device)
        return _soft_capped(query, key, value, mask, scaling, float(softcap)), None
    rows = int(kwargs.get(EQUAL_ROWS) or 0)  # `packed_kwargs` gives it only where the keys are the queries
    if query.is_cuda and rows and window is None and cudnn_attention.verified(query, key):
        try:
            return cudnn_attention.attend(query, key, value, scaling, rows), None
        except torch.OutOfMemoryError:
            raise  # the loop's recovery handles it
        except Exception as exc:
            cudnn_attention.give_up(exc)
    if query.is_cuda and varlen_supported(scaling, query.shape[-1], window):
        max_q = int(kwargs["max_length_q"])
        bounds = (cu_q, cu_k, max_q, int(kwargs.get("max_length_k") or max_q))
        return _varlen(query, key, value, kv_index, bounds, scaling, window), None
    if not query.is_cuda and kv_index is None and window is None and (cu_k is cu_q or torch.equal(cu_k, cu_q)):
        return _sdpa_per_sample(query, key, value, cu_q, scaling), None
    if kv_index is not None:
        key, value = key.index_select(2, kv_index), value.index_select(2, kv_index)
    if query.is_cuda:
        return _flex(query, key, value, cu_q, cu_k, scaling, window), None
    return _sdpa_block_causal(query, key, value, cu_q, cu_k, scaling, window), None


def register() -> None:
    """Makes `PACKED_ATTENTION` a valid `attn_implementation` name (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)


@contextmanager
def packed_attention(model: torch.nn.Module) -> Iterator[None]:
    """Switches `model` (and its sub-configs) to packed attention for the duration of training.

    Linear-attention layers (Qwen3.5) reset their state at every sample start meanwhile (`linear_attention`).
    """
    from backpropagate.train.torch.linear_attention import packed_linear_attention

    register()
    configs = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    unique = list({id(c): c for c in configs}.values())
    saved = [c._attn_implementation for c in unique]
    for c in unique:
        c._attn_implementation = PACKED_ATTENTION
    try:
        with packed_linear_attention(model):
            yield
    finally:
        for c, name in zip(unique, saved, strict=True):
            c._attn_implementation = name


def packed_kwargs(
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    kv_index: torch.Tensor | None = None,
    equal_rows: int = 0,
) -> dict[str, Any]:
    """The keyword arguments a model forward passes down to attention for a packed row.

    Args:
        cu_seqlens: [n + 1] int32 query boundaries (in stored order).
        max_seqlen: Longest query segment.
        cu_seqlens_k: [n + 1] key boundaries after `kv_index` (None: the query boundaries).
        max_seqlen_k: Longest key segment.
        kv_index: [T'] stored position of each key, or None (keys are the stored tokens).
        equal_rows: n where the n samples all have one length and fill the row (`count_equal_rows`), else 0.
    """
    kwargs: dict[str, Any] = {
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens if cu_seqlens_k is None else cu_seqlens_k,
        "max_length_q": max_seqlen,
        "max_length_k": max_seqlen if max_seqlen_k is None else max_seqlen_k,
    }
    if kv_index is not None:
        kwargs[KV_INDEX] = kv_index
    if equal_rows and cu_seqlens_k is None and kv_index is None:
        kwargs[EQUAL_ROWS] = equal_rows
    return kwargs


def count_equal_rows(cu_seqlens: np.ndarray, tokens: int) -> int:
    """How many samples the boundaries hold where all have one length and together fill `tokens`, else 0.

    Such a row is a batch of equal rows to attention kernels that take no sample boundaries.
    """
    lengths = np.diff(cu_seqlens)
    if len(lengths) == 0 or int(cu_seqlens[-1]) != tokens or int(cu_seqlens[0]) != 0:
        return 0
    return len(lengths) if bool((lengths == lengths[0]).all()) and lengths[0] > 0 else 0
