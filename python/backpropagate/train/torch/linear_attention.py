"""Linear-attention layers (Qwen3.5's Gated DeltaNet) over packed rows: each sample on its own.

A linear-attention layer carries a recurrent state, and a short causal convolution, from
token to token; in a packed row both would flow from one sample into the next. transformers'
torch implementation takes no sample boundaries (given `cu_seqlens` without the
flash-linear-attention kernels, it refuses the row), so while packed attention is on, each
sample's slice of the row runs through the layer alone (its state starts from zero, as in
the sample by itself) and the outputs are concatenated. Exact; one layer call per sample,
so slower than a varlen kernel would be.

With a shared-token layout (a preference pair's prompt stored once), a sample's stored
tokens are only its tail: the whole sample is gathered by `kv_index`, run, and its tail kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from backpropagate.train.torch.attention import KV_INDEX

# Keyword arguments that describe the packed row to attention; the layer run on one sample gets none.
_PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", KV_INDEX)


def linear_attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's recurrent token mixers (Gated DeltaNet layers), if any."""
    return [m for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet")]


def _per_sample(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        cu_q = kwargs.get("cu_seq_lens_q")
        if cu_q is None:
            return forward(hidden_states=hidden_states, **kwargs)
        cu_k, kv_index = kwargs.get("cu_seq_lens_k"), kwargs.get(KV_INDEX)
        whole = hidden_states if kv_index is None else hidden_states.index_select(1, kv_index)
        rest = {k: v for k, v in kwargs.items() if k not in _PACKED_KEYS}
        q_bounds = cu_q.tolist()
        k_bounds = q_bounds if cu_k is None else cu_k.tolist()
        outs = []
        for s in range(len(q_bounds) - 1):
            length_q = q_bounds[s + 1] - q_bounds[s]
            if length_q:
                out = forward(hidden_states=whole[:, k_bounds[s] : k_bounds[s + 1]], **rest)
                outs.append(out[:, out.shape[1] - length_q :])
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    return run


@contextmanager
def per_sample_linear_attention(model: torch.nn.Module) -> Iterator[None]:
    """Runs every linear-attention layer of `model` sample by sample on packed rows, for the duration."""
    layers = linear_attention_layers(model)
    saved = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        setattr(layer, "forward", _per_sample(layer.forward))  # noqa: B010
    try:
        yield
    finally:
        for layer, forward in zip(layers, saved, strict=True):
            if forward is None:
                del layer.forward
            else:
                setattr(layer, "forward", forward)  # noqa: B010
