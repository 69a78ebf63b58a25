"""Loading a model for training: device, precision, 4-bit quantization, adapters, fast paths.

bf16 on CUDA and on CPUs with bf16 units (avx512_bf16, AMX), fp32 on other CPUs, unless `precision` says otherwise; QLoRA (4-bit nf4 with double quantization) by default on
CUDA. Unlike peft's `prepare_model_for_kbit_training`, norms and the LM head stay in the
compute dtype: upcasting them to fp32 costs speed and memory and buys nothing once the
loss is computed in fp32 chunk by chunk. Full fine-tuning keeps fp32 master weights and
runs under bf16 autocast when the compute dtype is bf16; it is refused above `FULL_FT_MAX_PARAMS`, counted on the
meta device before any weight is read.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from backpropagate.config import TrainConfig
from backpropagate.errors import ConfigError, DependencyError, InputError, RunFailedError
from backpropagate.log import get_logger, quiet_bitsandbytes_import
from backpropagate.train.backend import resolve_backend
from backpropagate.train.torch import cudnn_attention, fp8, fused, lora_concat, lora_fused
from backpropagate.train.torch.losses import LMHead
from backpropagate.train.torch.precision import compute_dtype_for
from backpropagate.train.torch.recompute import RecomputePlan

log = get_logger("loading")

# "about 4B": lets 4B-class models (Qwen3-4B, Phi-4-mini) through, refuses 7B and up.
FULL_FT_MAX_PARAMS = 4_500_000_000


@dataclass
class TrainingModel:
    """A model ready for the loop, and what the loop needs to know about it.

    Attributes:
        model: The peft model (adapter modes) or the plain model (full fine-tuning).
        device: Where it runs.
        mode: lora, qlora or full.
        compute_dtype: dtype of activations.
        autocast: Whether forward runs under bf16 autocast (full fine-tuning in bf16).
        num_params: Parameters of the base model.
        recompute: Which layers recompute their activations in backward.
        features: Fast paths in use (for the log and the benchmark table).
    """

    model: Any
    device: torch.device
    mode: str
    compute_dtype: torch.dtype
    autocast: bool
    num_params: int
    recompute: RecomputePlan | None = None
    features: list[str] = field(default_factory=list)

    @property
    def base(self) -> Any:
        """The transformers model under the adapter."""
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if callable(get_base) else self.model

    @property
    def decoder(self) -> Any:
        """The stack that maps token ids to final hidden states (everything but the LM head)."""
        base = self.base
        getter = getattr(base, "get_decoder", None)
        decoder = getter() if callable(getter) else None
        return decoder if decoder is not None else base.model

    @property
    def lm_head(self) -> LMHead:
        """The output projection and the model's final logit soft-capping, for the loss."""
        weight: torch.Tensor = self.base.get_output_embeddings().weight
        # As transformers: Gemma3ForCausalLM caps, Gemma3ForConditionalGeneration (the image + text model) does not.
        softcap = getattr(self.base.config, "final_logit_softcapping", None)
        return LMHead(weight, float(softcap or 0.0))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters the optimizer updates, in a stable order."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Name -> tensor of every trainable parameter (what a checkpoint stores)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}


def resolve_device(name: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DependencyError("DEP_GPU_NOT_AVAILABLE", f"device={name!r} was asked for but CUDA is not available here")
    return device


def resolve_mode(mode: str, device: torch.device, fp8_weights: bool = False) -> str:
    """`auto` is QLoRA on CUDA (LoRA if bitsandbytes is missing or the weights go FP8) and LoRA on CPU."""
    if mode != "auto":
        return mode
    if device.type != "cuda" or fp8_weights:
        return "lora"
    if importlib.util.find_spec("bitsandbytes") is None:
        log.warning(
            "bitsandbytes is not installed: training a bf16 LoRA instead of QLoRA (pip install 'backpropagate[qlora]')"
        )
        return "lora"
    return "qlora"


def count_parameters(path: Path) -> int:
    """Parameters of the model in `path`, counted from its config on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def shards(config: TrainConfig) -> int:
    """Devices the model's weights, gradients and optimizer state are spread over (`fsdp`), else 1."""
    return config.gpus if config.fsdp else 1


def check_full_fine_tuning(path: Path, mode: str, over: int = 1) -> int:
    """Refuses full fine-tuning of models above ~4B parameters per device it is sharded `over`; returns the count."""
    params = count_parameters(path)
    limit = FULL_FT_MAX_PARAMS * over
    if mode == "full" and params > limit:
        raise RunFailedError(
            "RUNTIME_FULL_FT_MODEL_TOO_LARGE",
            f"mode='full' on {path} ({params / 1e9:.1f}B parameters) needs about {params * 16 / 2**30:.0f} GiB "
            f"for weights, gradients and optimizer state; full fine-tuning stops at "
            f"{limit / 1e9:.1f}B ({FULL_FT_MAX_PARAMS / 1e9:.1f}B per device, sharded with --gpus N --fsdp). "
            f"Use mode='lora' or mode='qlora' (the default on CUDA), "
            f"or a smaller preset such as llama-3.2-1b or qwen2.5-3b.",
        )
    return params


# Config fields whose attention packed rows do not reproduce yet (bidirectional Gemma).
UNSUPPORTED_TRAINING = ("use_bidirectional_attention",)
# Families only the torch rail trains exactly (Gemma 2's and 3's capping and windows, Qwen3.5's linear attention).
TORCH_RAIL_ONLY = ("gemma2", "gemma3", "gemma3_text", "qwen3_5", "qwen3_5_text")


def check_fine_tuning_allowed(path: Path, config: TrainConfig) -> None:
    """Refuses, before anything is loaded, what would train wrongly or not fit: bidirectional attention, size."""
    model_config = read_model_config(path)
    capped = [name for name in UNSUPPORTED_TRAINING if model_config.get(name)]
    if capped:
        raise InputError(
            "INPUT_UNSUPPORTED_ARCHITECTURE",
            f"{path}: training {model_config.get('model_type', 'this model')} is not supported yet: its "
            f"{' and '.join(capped)} would be left out of packed attention, so the model would learn the wrong thing",
            hint="Use a model family listed under 'Model families' in the README.",
        )
    model_type = model_config.get("model_type")
    if model_type in TORCH_RAIL_ONLY and resolve_backend(config.backend) == "mlx":
        raise InputError(
            "INPUT_UNSUPPORTED_ARCHITECTURE",
            f"{path}: training {model_type} on the MLX rail is not supported yet: its loss and packed rows "
            "do not reproduce this family's soft-capping, sliding windows or linear-attention layers",
            hint="Train it with backend='torch'.",
        )
    if config.mode == "full":
        check_full_fine_tuning(path, "full", shards(config))


def read_model_config(path: Path) -> dict[str, Any]:
    """config.json of a model folder (its text tower's part for a multimodal config), {} when absent."""
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    text = data.get("text_config")
    return {**data, **text} if isinstance(text, dict) else data


def load_base_model(path: Path, mode: str, device: torch.device, precision: str = "auto") -> Any:
    """Reads the weights in the precision `mode` trains with."""
    from transformers import AutoModelForCausalLM

    compute = compute_dtype_for(device, precision)
    # Training swaps in packed attention; outside it (evaluation without boundaries, generation)
    # SDPA, except for soft-capped attention (Gemma 2), which only the eager kernel computes.
    capped = read_model_config(path).get("attn_logit_softcapping")
    kwargs: dict[str, Any] = {"attn_implementation": "eager" if capped else "sdpa"}
    if mode == "qlora":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise DependencyError(
                "DEP_MISSING_PACKAGE", "mode='qlora' needs bitsandbytes: pip install 'backpropagate[qlora]'"
            )
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": "cpu"}
    if device.type == "cuda":  # weights go straight to the card, never through host memory
        kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
    kwargs["dtype"] = torch.float32 if mode == "full" else compute
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise InputError("INPUT_MODEL_LOAD_FAILED", f"{path}: {exc}") from exc
    return model


def attach_adapter(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """Freezes the base and adds a LoRA / rsLoRA / DoRA adapter through peft."""
    with quiet_bitsandbytes_import():
        from peft import LoraConfig, get_peft_model

    assert config.lora_r is not None and config.lora_alpha is not None
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=cast(Any, config.lora_alpha),  # peft types it int; fractional alphas work
        lora_dropout=config.lora_dropout,
        target_modules=config.target_module_list(),
        use_rslora=config.rslora,
        use_dora=config.dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        # peft calls a transformers alias that is deprecated, and imports bitsandbytes here (0.22+)
        with warnings.catch_warnings(), quiet_bitsandbytes_import():
            warnings.filterwarnings("ignore", category=FutureWarning)
            return get_peft_model(model, lora)
    except ValueError as exc:  # peft names the target modules it could not find
        raise ConfigError("CONFIG_INVALID_SETTING", f"target_modules={config.target_modules!r}: {exc}") from exc


def prepare_for_training(
    model: torch.nn.Module,
    config: TrainConfig,
    mode: str,
    device: torch.device,
    num_params: int,
    calibration: torch.Tensor | None = None,
) -> TrainingModel:
    """Adapter (or full training), fused fast paths and checkpointing on a loaded model.

    `calibration`: token ids of the training data [rows, length] that FP8 weights are rounded
    for (`fp8_gptq`); without them each weight takes its nearest e4m3 value.
    """
    features: list[str] = []
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = attach_adapter(model, config)
        # FP8 first: rounding for the data runs the model through peft's own layers.
        fp8_layers = fp8.install(model, calibration) if config.fp8 else 0
        fused_layers = lora_fused.install(model)
        if fused_layers:
            features.append(f"fused_lora[{fused_layers}]")
        if config.fp8:
            features.append(f"fp8[{fp8_layers}]")
            features.append(fp8.scales_feature(device))
            features.append(fp8.rounding_feature(model))
        elif not config.fsdp and (concat := lora_concat.install(model)):
            features.append(f"lora_concat[{concat}]")
    if config.fused_kernels and device.type == "cuda":
        features += fused.install(model)
    compute = compute_dtype_for(device, config.precision)
    if cudnn_attention.check(model, device, compute):
        features.append("cudnn_attention")
    recompute = RecomputePlan(model, config.gradient_checkpointing, config.offload_activations)
    model.train()
    return TrainingModel(
        model=model,
        device=device,
        mode=mode,
        compute_dtype=compute,
        autocast=mode == "full" and compute == torch.bfloat16,
        num_params=num_params,
        recompute=recompute,
        features=features,
    )


def load_adapter_weights(tm: TrainingModel, adapter: Path) -> None:
    """Puts the weights of a PEFT `adapter_model.safetensors` into `tm`'s freshly attached adapter.

    Training then starts from them instead of peft's initialisation (continual training
    starts each run from the previous run's adapter). Every tensor must match a parameter
    of the adapter, by name and shape.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if tm.mode == "full":
        raise ConfigError(
            "CONFIG_INVALID_SETTING", "init_adapter needs an adapter mode (lora or qlora), not mode='full'"
        )
    try:
        state = load_file(adapter)
        result: Any = set_peft_model_state_dict(tm.model, state)
    except (OSError, RuntimeError, ValueError) as exc:  # missing/damaged file, tensor shapes that differ
        raise InputError("INPUT_ADAPTER_INVALID", f"{adapter}: cannot load it into this adapter ({exc})") from exc
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        what = "match no adapter layer of this model" if result.unexpected_keys else "of this adapter are not in it"
        example = (result.unexpected_keys or missing)[0]
        raise InputError(
            "INPUT_ADAPTER_INVALID",
            f"{adapter}: {len(result.unexpected_keys or missing)} tensor(s) {what}, e.g. {example} "
            "(another model or target_modules?)",
        )
    lora_fused.adapters_updated()


def load_for_training(
    path: Path, config: TrainConfig, init_adapter: Path | None = None, calibration: torch.Tensor | None = None
) -> TrainingModel:
    """Everything between a model folder and a model the loop can train (from `init_adapter`'s weights if given).

    `calibration`: see `prepare_for_training`.
    """
    device = resolve_device(config.device)
    mode = resolve_mode(config.mode, device, config.fp8)
    if config.fp8:
        fp8.check_supported(device, compute_dtype_for(device, config.precision))
    num_params = check_full_fine_tuning(path, mode, shards(config))
    model = load_base_model(path, mode, device, config.precision)
    trained = prepare_for_training(model, config, mode, device, num_params, calibration)
    if init_adapter is not None:
        load_adapter_weights(trained, init_adapter)
    log.info(
        "model %s: %s parameters, mode=%s, device=%s, %s compute, %s",
        path,
        f"{num_params / 1e9:.2f}B" if num_params >= 1e8 else f"{num_params / 1e6:.2f}M",
        mode,
        device,
        str(trained.compute_dtype).removeprefix("torch."),
        ", ".join(trained.features + ([trained.recompute.describe()] if trained.recompute else [])),
    )
    return trained
