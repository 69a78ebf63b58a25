"""Loading a model for the MLX rail: mlx-lm's model classes, 4-bit quantization, LoRA / DoRA layers.

The base model is read by mlx-lm's loader from the same Hugging Face folder the torch
rail reads. QLoRA quantizes it on load with `mlx.nn.quantize` (4 bits, groups of 64), or
takes an already quantized MLX folder (mlx-community) as it is. Weights are fp32 on the
CPU and bf16 on the Apple GPU; adapters and
full fine-tuning weights train in fp32.

Adapter matrices are stored in PEFT's orientation (`lora_A` r x in, `lora_B` out x r),
so saving them in PEFT's layout is a renaming, and DoRA follows peft's `DoraLinearLayer`
term for term (magnitude over the row norm of W + scale x B A, the norm detached).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from backpropagate.config import TrainConfig
from backpropagate.errors import ConfigError, InputError
from backpropagate.log import get_logger

log = get_logger("mlx")

QUANT_BITS = 4
QUANT_GROUP = 64


class LoraLinear(nn.Module):
    """A frozen linear (dense or 4-bit) plus a trainable low-rank update, optionally DoRA.

    Args:
        base: The layer it adapts (`nn.Linear` or `nn.QuantizedLinear`).
        rank: r.
        scale: alpha / r, or alpha / sqrt(r) for rsLoRA.
        dropout: Dropout on the adapter's input.
        dora: Learn a per-output magnitude as well (weight-decomposed LoRA).
    """

    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float, dora: bool) -> None:
        super().__init__()
        out_dims, in_dims = dense_weight(base).shape
        self.base = base
        self.scale = scale
        self.dropout_rate = dropout
        self.dropout = nn.Dropout(dropout)
        bound = 1 / math.sqrt(in_dims)  # peft's kaiming_uniform_(a=sqrt(5)) bound
        self.lora_A = mx.random.uniform(-bound, bound, (rank, in_dims))
        self.lora_B = mx.zeros((out_dims, rank))
        if dora:
            self.magnitude = self.weight_norm()

    def weight_norm(self) -> mx.array:
        """Row norms of W + scale x B A (what DoRA divides by), without gradient."""
        weight = dense_weight(self.base).astype(mx.float32) + self.scale * (self.lora_B @ self.lora_A)
        return mx.stop_gradient(mx.sqrt(mx.sum(mx.square(weight), axis=1)))

    def __call__(self, x: mx.array) -> mx.array:
        """Base output plus the scaled low-rank update (DoRA: rescaled to the learned magnitude)."""
        y = self.base(x)
        xd = self.dropout(x)
        lora = ((xd @ self.lora_A.T.astype(x.dtype)) @ self.lora_B.T.astype(x.dtype)) * self.scale
        if "magnitude" not in self:
            return y + lora
        ratio = (self.magnitude / self.weight_norm()).astype(x.dtype)
        bias = self.base.get("bias", None)
        plain = xd @ dense_weight(self.base).T if self.dropout_rate > 0 else (y if bias is None else y - bias)
        return y + (ratio - 1) * plain + ratio * lora


def flatten(tree: Any) -> dict[str, mx.array]:
    """{"model.layers.0.mlp.up_proj.lora_A": array, ...} of a parameter tree."""
    return cast(dict[str, mx.array], dict(tree_flatten(tree)))


def scalar(value: mx.array) -> float:
    """A one-element array as a Python float (waits for it to be computed)."""
    return float(cast(float, value.item()))


def dense_weight(layer: nn.Module) -> mx.array:
    """The [out, in] weight of a dense or quantized linear layer."""
    if isinstance(layer, nn.QuantizedLinear):
        return mx.dequantize(
            layer.weight,
            layer.scales,
            layer.get("biases"),
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )
    weight: mx.array = layer.weight
    return weight


@dataclass
class MlxTrainingModel:
    """A model ready for the MLX loop.

    Attributes:
        net: The mlx-lm model (with `LoraLinear` layers in adapter modes).
        mode: lora, qlora or full.
        path: The folder it was read from.
        num_params: Parameters of the base model.
        adapted: Module paths that carry an adapter (e.g. model.layers.0.self_attn.q_proj).
        config: The run's settings (rank, alpha, DoRA, targets) for the adapter files.
        attention_share: `attention_share` of the model (how the loop lays out micro-batches).
        features: What the run uses, for the log and the run file.
    """

    net: Any
    mode: str
    path: Path
    num_params: int
    adapted: list[str]
    config: TrainConfig
    attention_share: float
    features: list[str] = field(default_factory=list)

    @property
    def model(self) -> Any:
        """What `train.outputs.save_final` saves: a PEFT adapter folder or a full model folder."""
        from backpropagate.train.mlx.adapters import FullModelFolder, PeftAdapterFolder

        return FullModelFolder(self) if self.mode == "full" else PeftAdapterFolder(self)

    def trainable(self) -> dict[str, mx.array]:
        """Name -> array of every trainable parameter (what a checkpoint stores)."""
        return flatten(self.net.trainable_parameters())


def read_config(path: Path) -> dict[str, Any]:
    """The folder's config.json."""
    try:
        config: dict[str, Any] = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError("INPUT_MODEL_LOAD_FAILED", f"{path / 'config.json'} cannot be read ({exc})") from exc
    return config


def mlx_config(path: Path) -> dict[str, Any]:
    """Overrides mlx-lm needs for configs written by transformers 5 (rope settings under `rope_parameters`)."""
    config = read_config(path)
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" in config:
        return {}
    overrides: dict[str, Any] = {"rope_theta": rope.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        overrides["rope_scaling"] = rope
    return overrides


def is_quantized_folder(path: Path) -> bool:
    """An MLX folder whose weights are already quantized (mlx_lm.convert -q, mlx-community)."""
    return "quantization" in read_config(path)


def resolve_mode(mode: str, path: Path) -> str:
    """`auto` is QLoRA on an already quantized folder and LoRA otherwise; a quantized folder trains only as QLoRA."""
    quantized = is_quantized_folder(path)
    if mode == "auto":
        return "qlora" if quantized else "lora"
    if quantized and mode != "qlora":
        raise ConfigError(
            "CONFIG_INVALID_SETTING",
            f"mode={mode!r} is invalid for {path}: its weights are already quantized; use mode='qlora'",
        )
    return mode


def quantize(net: nn.Module) -> int:
    """Quantizes every linear and embedding whose rows split into groups of 64 to 4 bits; returns how many."""
    count = 0

    def predicate(_: str, module: nn.Module) -> bool:
        nonlocal count
        ok = hasattr(module, "to_quantized") and module.weight.shape[-1] % QUANT_GROUP == 0
        count += ok
        return bool(ok)

    nn.quantize(net, group_size=QUANT_GROUP, bits=QUANT_BITS, class_predicate=predicate)
    return count


def linear_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every linear layer of the transformer blocks (never the LM head)."""
    return [
        (name, module)
        for name, module in net.named_modules()
        if isinstance(module, (nn.Linear, nn.QuantizedLinear)) and ".layers." in f".{name}"
    ]


def attach_adapters(net: nn.Module, config: TrainConfig) -> list[str]:
    """Freezes the base and wraps the target linear layers in `LoraLinear`; returns their paths."""
    assert config.lora_r is not None and config.lora_alpha is not None
    targets = config.target_module_list()
    chosen = [(n, m) for n, m in linear_layers(net) if targets == "all-linear" or n.rsplit(".", 1)[-1] in targets]
    if targets != "all-linear":
        missing = sorted(set(targets) - {n.rsplit(".", 1)[-1] for n, _ in chosen})
        if missing:
            raise ConfigError(
                "CONFIG_INVALID_SETTING",
                f"target_modules={config.target_modules!r}: the model has no layer named {', '.join(missing)}",
            )
    scale = config.lora_alpha / (math.sqrt(config.lora_r) if config.rslora else config.lora_r)
    net.freeze()
    wrapped = [
        (name, LoraLinear(module, config.lora_r, scale, config.lora_dropout, config.dora)) for name, module in chosen
    ]
    net.update_modules(_nested(wrapped))
    return [name for name, _ in wrapped]


def _nested(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """{"a.0.b": x} -> {"a": [{"b": x}]}-style tree that `update_modules` takes (lists for numeric keys)."""
    from mlx.utils import tree_unflatten

    tree: dict[str, Any] = tree_unflatten(items)
    return tree


def weight_count(layer: nn.Module) -> int:
    """Weights of a dense or quantized linear / embedding layer, quantized ones by their unpacked size."""
    weight: mx.array = layer.weight
    bits = getattr(layer, "bits", None)
    return weight.size * 32 // bits if bits else weight.size


def count_params(net: nn.Module) -> int:
    """Parameters of the model (quantized weights counted by their unpacked size)."""
    layers = (nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding)
    total = sum(weight_count(m) for _, m in net.named_modules() if isinstance(m, layers))
    norms = sum(v.size for k, v in flatten(net.parameters()).items() if k.endswith("norm.weight"))
    return total + norms


def attention_share(net: Any) -> float:
    """Attention's cost per key and query relative to a token's pass through a block's weights (2 x hidden / weights)."""
    block = net.model.layers[0]
    weights = sum(weight_count(m) for _, m in block.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear)))
    hidden = net.model.norm.weight.shape[0]
    return 2 * hidden / max(1, weights)


def load_for_training(path: Path, config: TrainConfig) -> MlxTrainingModel:
    """Everything between a model folder and a model the MLX loop can train."""
    from mlx_lm.utils import load_model

    mode = resolve_mode(config.mode, path)
    try:
        net, _ = load_model(path, model_config=mlx_config(path))
    except (OSError, ValueError, KeyError) as exc:
        raise InputError("INPUT_MODEL_LOAD_FAILED", f"{path}: {exc}") from exc
    gpu = mx.default_device() == mx.gpu
    features = [f"mlx[{'gpu' if gpu else 'cpu'}]"]
    compute = mx.bfloat16 if gpu and mode != "full" else mx.float32
    net.set_dtype(compute)
    if mode == "qlora" and not is_quantized_folder(path):
        features.append(f"quantized_on_load[{quantize(net)} layers, {QUANT_BITS}-bit]")
    num_params = count_params(net)
    share = attention_share(net)
    adapted: list[str] = []
    mx.random.seed(config.seed)  # adapter initialisation
    if mode == "full":
        net.unfreeze()
    else:
        adapted = attach_adapters(net, config)
        features.append(f"{'dora' if config.dora else 'rslora' if config.rslora else 'lora'}[{len(adapted)}]")
    net.train()
    mx.eval(net.parameters())
    log.info("model %s: %.2fM parameters, mode=%s, %s", path, num_params / 1e6, mode, ", ".join(features))
    return MlxTrainingModel(
        net=net,
        mode=mode,
        path=path,
        num_params=num_params,
        adapted=adapted,
        config=config,
        attention_share=share,
        features=features,
    )


def hidden_states(net: Any, input_ids: mx.array, mask: mx.array) -> mx.array:
    """Final hidden states [B, L, H] under an explicit attention mask (mlx-lm's own forward builds a causal one)."""
    h = net.model.embed_tokens(input_ids)
    for layer in net.model.layers:
        h = layer(h, mask, cache=None)
    out: mx.array = net.model.norm(h)
    return out


def lm_head(net: Any, hidden: mx.array) -> mx.array:
    """Logits of `hidden` ([N, H] -> [N, V]) through the model's own head (tied or not, dense or 4-bit)."""
    head = getattr(net, "lm_head", None)
    logits: mx.array = head(hidden) if head is not None else net.model.embed_tokens.as_linear(hidden)
    return logits
