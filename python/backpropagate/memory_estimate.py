"""Peak training memory on one card, predicted from a model's config.json, and the longest context that fits.

The prediction follows what the PyTorch rail holds at its peak with every layer recomputed,
at batch 1 (one packed row of T tokens), in bf16 (B = 2 bytes). The step goes through
phases that never overlap, so the peak is the static memory, what lives through the whole
step, and the largest phase:

    peak = weights + adapter + T * (saved + step) + max(attention_backward, mlp_backward, loss) + margin

* weights: the decoder's linear layers at 2 B per parameter (lora), 0.578 B in nf4
  (qlora: 0.5 B of codes, 8-bit block scales per 64 with fp32 scales of those per 256,
  and the fp32 block scales the fused LoRA op caches, 4 B per 64), or 16 B (full: fp32
  weight, gradient and two AdamW moments); embeddings, LM head and norms at 2 B (full: 16 B).
  With fp8 (lora only) the linear layers take 1 B, and the backward transposes one layer's
  largest e4m3 weight at a time (its bytes once more).
  In qlora a recomputed layer keeps its dequantized weights until its backward: one
  layer's linear weights at 2 B.
* adapter: rank-r A and B on every targeted projection (all linear layers by default):
  fp32 master, gradient and two AdamW moments (16 B per parameter) plus bf16 copies (2 B).
* saved: each layer's input, H B per token per layer, while the layer waits for its
  backward. With activation offload only the inputs of the last layers (one, or as many as
  the host memory requires) and the one being prefetched stay on the card; the rest
  (`host_bytes`, `offloaded_layers`) waits in pinned host memory. Where the host holds too
  few, it takes as many as it holds and backward replays the others (`replayed_layers`,
  `offload.py`) in segments of up to `every` layers, which hold up to `every` inputs on the
  card and one prefetched. The segments lie below the layers whose inputs stay on the card,
  which backward is done with by then, so the card holds max(on_card, every) + 1 inputs at
  most, and keeps as many inputs as a segment holds (`place_inputs`).
* step: through the step, the rotary cos and sin tables (2 head_dim B) and the token ids,
  positions and targets (3 x 8 B); in backward, the residual stream's gradient (H B).
* attention_backward: a recomputed layer in flash attention's backward holds its first
  norm's output (H), what attention saved, q, k, v, its output and the fp32 log-sum-exp
  (Hq + 2 Hkv, Hq, 4 B per head), the gradient of that output, dq, dk and dv (Hq + Hq +
  2 Hkv), the kernel's fp32 dq accumulator (4 B per Hq) and, with grouped-query attention,
  dk and dv spread over every query head before they are summed (2 Hq).
* mlp_backward: the layer's saved tensors (H + 2 Hq + 2 Hkv, then its second norm's input
  and output, 2 H), the MLP's incoming gradient and its input gradient (2 H), and one slice
  of `chunked_mlp.CHUNK_TOKENS` tokens in work: gate, up, their product and their
  gradients (6 intermediate-wide tensors) and the slice's output.
* loss: after the last layer, the final norm's input and output and the gradient the
  chunked loss keeps of the hidden state (3 H B per token), plus one chunk of
  `losses.chunk_length` positions of logits: bf16 logits, an fp32 copy and softmax
  gradient, the bf16 gradient (12 B per logit).
* margin: 5% of the total plus 256 MiB for the allocator's fragmentation and rounding.

Without offload, `auto` (the default) offloads only when the step would not fit the card.
The longest context for a card is the largest T whose peak fits, found by bisection; given
the host memory (`host_gib`), also its offloaded inputs must fit there, and the card keeps
the inputs of the layers the host cannot take.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from backpropagate.errors import ConfigError, InputError

MODES = ("lora", "qlora", "full")
CARDS_GIB = (16, 24, 48, 80)
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256) + 4 / 64
MARGIN_SHARE = 0.05
MARGIN_BYTES = 256 * 2**20
_GIB = 2**30


@dataclass(frozen=True)
class Shape:
    """What the estimate reads from a config.json."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config: Any) -> Shape:
        """From a transformers config object or a config.json dict."""
        text = config.get("text_config") if isinstance(config, dict) else getattr(config, "text_config", None)
        if text is not None:  # a multimodal model's language part
            config = text

        def get(key: str, default: Any = None) -> Any:
            return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)

        try:
            hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
            return cls(
                hidden=hidden,
                layers=int(get("num_hidden_layers")),
                heads=heads,
                kv_heads=int(get("num_key_value_heads") or heads),
                head_dim=int(get("head_dim") or hidden // heads),
                intermediate=int(get("intermediate_size") or 4 * hidden),
                vocab=int(get("vocab_size")),
                tied=bool(get("tie_word_embeddings", False)),
            )
        except (TypeError, ValueError) as exc:
            raise InputError(
                "INPUT_MODEL_LOAD_FAILED", f"config.json lacks the decoder's sizes (hidden_size, ...): {exc}"
            ) from exc

    @property
    def linear_in_out(self) -> list[tuple[int, int]]:
        """(in, out) of one layer's q, k, v, o, gate, up, down projections."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


@dataclass
class MemoryEstimate:
    """Predicted peak memory of a training step, by part, in bytes.

    Attributes:
        tokens: Tokens in the micro-batch.
        mode: lora, qlora or full.
        offload: Whether recomputed layers' inputs wait in host memory.
        parts: Bytes by part (see the module doc).
        host_bytes: Pinned host memory the offloaded inputs take.
        offloaded_layers: Layers whose inputs wait in host memory.
        replayed_layers: Layers whose inputs backward replays from an offloaded one below them.
        max_context: Longest trainable context per card size (GiB -> tokens), offload as needed.
        fp8: Whether the base weights are in FP8.
    """

    tokens: int
    mode: str
    offload: bool
    parts: dict[str, int]
    host_bytes: int
    offloaded_layers: int = 0
    replayed_layers: int = 0
    max_context: dict[int, int] = field(default_factory=dict)
    fp8: bool = False

    @property
    def peak_bytes(self) -> int:
        """The predicted peak of memory allocated on the card."""
        return sum(self.parts.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the peak and GiB figures."""
        out = asdict(self)
        out["peak_bytes"] = self.peak_bytes
        out["peak_gib"] = round(self.peak_bytes / _GIB, 2)
        return out


def _bytes_per_dtype(dtype: Any) -> int:
    import torch

    return torch.finfo(dtype).bits // 8 if isinstance(dtype, torch.dtype) else int(dtype)


def _layer_input_bytes(shape: Shape, tokens: int, dtype_bytes: int) -> int:
    """One decoder layer's input, [tokens, hidden]: what a recomputed layer keeps, or offloads, until its backward."""
    return shape.hidden * dtype_bytes * tokens


def activation_parts(
    shape: Shape, tokens: int, dtype_bytes: int, offload: bool, on_card: int = 1, every: int = 1
) -> dict[str, int]:
    """Activation memory of a fully recomputed step: what lives through it, and its largest phase (module doc).

    With offload, the last `on_card` layers' inputs stay on the card, and one more is
    prefetched; a segment of `every` replayed layers, further down, holds `every` once those
    are gone.
    """
    from backpropagate.train.torch.losses import chunk_length

    h, b = shape.hidden, dtype_bytes
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    on_card_layers = min(shape.layers, max(on_card, every) + 1) if offload else shape.layers
    attention_saved = (h + 2 * q + 2 * kv) * b + 4 * shape.heads
    gqa_spread = 2 * q * b if kv < q else 0
    phases = {
        "attention_backward": tokens * (attention_saved + (2 * q + 2 * kv) * b + 4 * q + gqa_spread),
        "mlp_backward": tokens * (attention_saved + 4 * h * b) + _mlp_slice_bytes(shape, tokens, b),
        "loss": tokens * 3 * h * b + min(tokens, chunk_length(shape.vocab)) * shape.vocab * 12,
    }
    busiest = max(phases, key=lambda name: phases[name])
    return {
        "saved_inputs": on_card_layers * _layer_input_bytes(shape, tokens, b),
        "step_state": tokens * (2 * shape.head_dim * b + 3 * 8 + h * b),
        busiest: phases[busiest],
    }


def _mlp_slice_bytes(shape: Shape, tokens: int, dtype_bytes: int) -> int:
    """A recomputed MLP's backward work on one slice: gate, up, their product and their gradients."""
    from backpropagate.train.torch.chunked_mlp import CHUNK_TOKENS

    return min(tokens, CHUNK_TOKENS) * (6 * shape.intermediate + shape.hidden) * dtype_bytes


def whole_mlp_backward_excess(config: Any, tokens: int, dtype: Any) -> int:
    """Bytes a kept layer's whole MLP backward holds beyond one recomputed slice's work.

    Its gradients of gate, up and their product at every token (the intermediates themselves
    are counted as kept activations), against `_mlp_slice_bytes`.
    """
    shape, b = Shape.of(config), _bytes_per_dtype(dtype)
    return max(0, 3 * shape.intermediate * tokens * b - _mlp_slice_bytes(shape, tokens, b))


def offloaded_bytes(
    shape: Shape, tokens: int, dtype_bytes: int, on_card: int = 1, every: int = 1, room: int | None = None
) -> int:
    """Host memory the offloaded layer inputs of a step take: those of the layers but the last `on_card` stored there."""
    return stored_layers(shape.layers - on_card, every, room) * _layer_input_bytes(shape, tokens, dtype_bytes)


def stored_layers(moved: int, every: int, room: int | None = None) -> int:
    """Of `moved` layers whose inputs leave the card, those whose inputs go to the host.

    At least one per segment of `every`; where the host has `room` for more inputs, it takes up
    to that many, since each input stored is one layer fewer to replay.
    """
    moved = max(moved, 0)
    return max(-(-moved // every), min(moved, room or 0))


def host_room(one: int, host_bytes: float | None) -> int | None:
    """How many layer inputs of `one` bytes `host_bytes` holds (None: unbounded)."""
    return None if host_bytes is None else int(host_bytes // max(one, 1))


def input_bytes(config: Any, tokens: int, dtype: Any) -> int:
    """One layer's input at `tokens` tokens: what each layer offloaded moves to the host and back."""
    return _layer_input_bytes(Shape.of(config), tokens, _bytes_per_dtype(dtype))


def place_inputs(layers: int, room: int | None, more: int = 0, longest: int | None = None) -> tuple[int, int]:
    """Where `layers` recomputed layers' inputs wait: (inputs kept on the card, longest segment of replayed layers).

    The card keeps the last 1 + `more` (`more`: room for inputs beyond one kept and one
    prefetched). Where the host's `room` (inputs; None: unbounded) cannot take the rest, the
    shortest segment whose first inputs it can, up to `longest` layers (None: any). A segment
    holds its inputs on the card in backward after the card's own have gone, so the card then
    keeps as many as a segment holds, for free. Where none fits, the longest (the caller warns).
    """
    choices = [
        (max(1, min(max(1 + more, every), layers - 1)), every) for every in range(1, max(1, longest or layers - 1) + 1)
    ]
    fitting = (c for c in choices if room is None or stored_layers(layers - c[0], c[1]) <= room)
    return next(fitting, choices[-1])


def on_card_for_host(layers: int, room: int | None) -> tuple[int, int]:
    """Where offloaded inputs go when the host has `room` for that many: (inputs kept on the card, segment length).

    The fewest inputs on the card that leave the host what it holds (`place_inputs`); with no
    room on the host, all of them.
    """
    if room is not None and room < 1:
        return layers, 1
    return place_inputs(layers, room)


def host_shortfall(
    config: Any,
    tokens: int,
    dtype: Any,
    available: float | None,
    on_card: int = 1,
    every: int = 1,
    room: int | None = None,
) -> str | None:
    """Why offloading a step of `tokens` would not fit the `available` host memory, or None when it fits.

    The last `on_card` layers' inputs stay on the card; of the others, the host stores one per
    segment of `every`, or as many as its `room` (`stored_layers`).
    """
    needed = offloaded_bytes(Shape.of(config), tokens, _bytes_per_dtype(dtype), on_card, every, room)
    if available is None or needed <= available:
        return None
    return (
        f"activation offload needs {needed / _GIB:.1f} GiB of host memory at {tokens} tokens and "
        f"{available / _GIB:.1f} GiB is available: the system may end the run for memory; "
        "`backprop estimate-memory --host-gib` shows the longest context that fits"
    )


def recomputed_step_bytes(config: Any, tokens: int, dtype: Any, offload: bool) -> int:
    """Activation bytes of a fully recomputed step (what the recompute planner holds against free memory)."""
    return sum(activation_parts(Shape.of(config), tokens, _bytes_per_dtype(dtype), offload).values())


def _static_parts(shape: Shape, mode: str, lora_r: int, fp8: bool = False) -> dict[str, int]:
    linear = sum(i * o for i, o in shape.linear_in_out)
    other = shape.vocab * shape.hidden * (1 if shape.tied else 2) + (2 * shape.layers + 1) * shape.hidden
    if mode == "full":
        return {"weights": 16 * (linear * shape.layers + other)}
    per_weight = NF4_BYTES if mode == "qlora" else 1 if fp8 else 2
    parts = {
        "weights": int(per_weight * linear * shape.layers + 2 * other),
        "adapter": 18 * lora_r * sum(i + o for i, o in shape.linear_in_out) * shape.layers,
    }
    if mode == "qlora":
        parts["dequantized_layer"] = 2 * linear
    if fp8:
        parts["fp8_transposed"] = max(i * o for i, o in shape.linear_in_out)
    return parts


def _estimate(
    shape: Shape,
    tokens: int,
    mode: str,
    lora_r: int,
    offload: bool,
    dtype_bytes: int = 2,
    fp8: bool = False,
    host_bytes: float | None = None,
) -> MemoryEstimate:
    """The estimate of one setting; with offload, as `on_card_for_host` places what `host_bytes` cannot hold."""
    room = host_room(_layer_input_bytes(shape, tokens, dtype_bytes), host_bytes)
    on_card, every = on_card_for_host(shape.layers, room) if offload else (shape.layers, 1)
    offload = offload and on_card < shape.layers
    activations = activation_parts(shape, tokens, dtype_bytes, offload, on_card, every)
    parts = _static_parts(shape, mode, lora_r, fp8) | activations
    parts["margin"] = int(MARGIN_SHARE * sum(parts.values())) + MARGIN_BYTES
    host = offloaded_bytes(shape, tokens, dtype_bytes, on_card, every, room) if offload else 0
    stored = stored_layers(shape.layers - on_card, every, room) if offload else 0
    return MemoryEstimate(
        tokens=tokens,
        mode=mode,
        offload=offload,
        parts=parts,
        host_bytes=host,
        offloaded_layers=stored,
        replayed_layers=shape.layers - on_card - stored if offload else 0,
        fp8=fp8,
    )


def fits(
    shape: Shape,
    tokens: int,
    mode: str,
    lora_r: int,
    card_bytes: float,
    offload: bool | None,
    host_bytes: float | None = None,
    fp8: bool = False,
) -> bool:
    """Whether a step of `tokens` fits `card_bytes` (offload None: with offload if needed), and `host_bytes` if given."""
    choices = (False, True) if offload is None else (offload,)
    return any(
        _estimate(shape, tokens, mode, lora_r, o, fp8=fp8, host_bytes=host_bytes).peak_bytes <= card_bytes
        for o in choices
    )


def longest_context(
    shape: Shape,
    mode: str,
    lora_r: int,
    card_gib: float,
    offload: bool | None = None,
    limit: int = 1 << 20,
    host_gib: float | None = None,
    fp8: bool = False,
) -> int:
    """The most tokens whose step fits a card of `card_gib` GiB, and `host_gib` GiB of host memory if given."""
    card, host = card_gib * _GIB, None if host_gib is None else host_gib * _GIB
    if not fits(shape, 1, mode, lora_r, card, offload, host, fp8):
        return 0
    low, high = 1, limit
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(shape, mid, mode, lora_r, card, offload, host, fp8) else (low, mid - 1)
    return low


def read_config(model: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A model's config.json as a dict: from a dict, a folder or file path, a preset or a hub id (no weights)."""
    if isinstance(model, dict):
        return model
    path = Path(model).expanduser()
    if path.is_file():
        config_file = path
    else:
        from backpropagate.model_source import resolve_model

        config_file = resolve_model(str(model), weights=False) / "config.json"
    try:
        data = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError("INPUT_MODEL_LOAD_FAILED", f"{config_file}: cannot read config.json ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError("INPUT_MODEL_LOAD_FAILED", f"{config_file}: config.json is not a JSON object")
    return dict(data.get("text_config") or data)


def estimate_memory(
    model: str | Path | dict[str, Any],
    max_seq_length: int,
    mode: str = "qlora",
    lora_r: int = 16,
    card_gib: int | None = None,
    offload: bool | None = None,
    dtype_bytes: int = 2,
    host_gib: float | None = None,
    fp8: bool = False,
) -> MemoryEstimate:
    """Predicts the peak memory of training `model` on one packed row of `max_seq_length` tokens.

    Args:
        model: A model folder, a config.json file, a preset, a hub id (config only) or a config dict.
        max_seq_length: Tokens per micro-batch.
        mode: lora, qlora or full.
        lora_r: Adapter rank (every linear layer of the decoder targeted).
        card_gib: The card it should fit; also listed in `max_context`.
        offload: Activation offload on (True), off (False), or (None) only where the step would
            not fit `card_gib` otherwise.
        dtype_bytes: Bytes per activation element: 2 (bf16, CUDA) or 4 (fp32, the CPU's default).
        host_gib: The host memory offloaded inputs may take: the card keeps the inputs it cannot
            hold, and it bounds `max_context` (None: unbounded).
        fp8: Base weights in FP8 (`--fp8`, mode lora only).

    Returns:
        The estimate by part, and the longest context per card size (offload where needed).
    """
    if mode not in MODES:
        raise ConfigError("CONFIG_INVALID_SETTING", f"mode={mode!r} is invalid: expected one of {', '.join(MODES)}")
    for name, value in (("max_seq_length", max_seq_length), ("lora_r", lora_r), ("card_gib", card_gib or 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError("CONFIG_INVALID_SETTING", f"{name}={value!r} is invalid: expected an integer at least 1")
    if host_gib is not None and (isinstance(host_gib, bool) or not isinstance(host_gib, (int, float)) or host_gib <= 0):
        raise ConfigError("CONFIG_INVALID_SETTING", f"host_gib={host_gib!r} is invalid: expected a number above 0")
    if fp8 and mode != "lora":
        raise ConfigError(
            "CONFIG_INVALID_SETTING", f"fp8=True with mode={mode!r} is invalid: FP8 base weights are lora only"
        )
    shape = Shape.of(read_config(model))
    use_offload = bool(offload)
    if offload is None and card_gib is not None:
        use_offload = _estimate(shape, max_seq_length, mode, lora_r, False, fp8=fp8).peak_bytes > card_gib * _GIB
    host = None if host_gib is None else host_gib * _GIB
    estimate = _estimate(shape, max_seq_length, mode, lora_r, use_offload, dtype_bytes, fp8, host)
    cards = sorted({*CARDS_GIB, *([card_gib] if card_gib else [])})
    estimate.max_context = {
        g: longest_context(shape, mode, lora_r, g, offload, host_gib=host_gib, fp8=fp8) for g in cards
    }
    return estimate
