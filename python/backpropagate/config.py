"""Training settings: one dataclass whose field docs are also the `backprop train` help.

Every option of `Trainer(model, **options)` is a field of `TrainConfig`, and the CLI
builds one flag per field from the same metadata (`cli/options.py`), so the API, the
CLI and their documentation cannot drift apart. Fields left at `None` are filled from
the model's preset (rank, alpha, learning rate, context) or a general default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from backpropagate.errors import ConfigError
from backpropagate.presets import Preset, find_preset
from backpropagate.settings import SEQ_LENGTH, Range, at_least, check_fields, invalid, non_negative, option, positive
from backpropagate.train.backend import BACKENDS

MODES = ("auto", "lora", "qlora", "full")
METHODS = ("sft", "orpo", "simpo", "kto")
PREFERENCE_METHODS = ("orpo", "simpo", "kto")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
CHECKPOINTING = ("auto", "on", "off")
PRECISIONS = ("auto", "bf16", "fp32")
REPORT_TO = ("auto", "none", "tensorboard", "wandb", "tensorboard,wandb")

# Used when neither the user nor a preset sets them.
DEFAULT_LORA_R = 16
DEFAULT_LEARNING_RATE = 2e-4
DEFAULT_MAX_SEQ_LENGTH = 2048
# Reasoning traces are long: their default context, unless max_seq_length is set.
REASONING_MAX_SEQ_LENGTH = 8192
# Default peak learning rates of the preference methods (LoRA), used unless learning_rate is set:
# ORPO's paper value; 5e-6 is the usual LoRA rate for the reference-scaled SimPO and KTO objectives.
METHOD_LEARNING_RATES = {"orpo": 8e-6, "simpo": 5e-6, "kto": 5e-6}


@dataclass
class TrainConfig:
    """Everything a training run can be told; see each field's help."""

    # Model and method
    mode: str = option(
        "auto",
        "What to train: lora (bf16 base + adapter), qlora (4-bit nf4 base + adapter), full "
        "(all weights, models up to ~4B), auto = qlora on CUDA, lora on CPU.",
        group="Model",
        choices=MODES,
    )
    method: str = option(
        "sft",
        "Training objective: sft (supervised fine-tuning), orpo or simpo (prompt/chosen/rejected pairs, no "
        "reference model), kto (prompt/completion/label rows, or pairs; the base model is the reference).",
        group="Model",
        choices=METHODS,
    )
    device: str = option("auto", "Device: auto, cuda, cuda:N or cpu.", group="Model")
    precision: str = option(
        "auto",
        "Dtype the frozen base weights and activations compute in: bf16, fp32, or auto (bf16 on CUDA and on CPUs "
        "with avx512_bf16 or AMX, fp32 on other CPUs, where bf16 is emulated and slower). Adapter weights, gradients "
        "and optimizer state stay fp32 either way; mode=full keeps fp32 weights and runs bf16 under autocast.",
        group="Model",
        choices=PRECISIONS,
    )
    backend: str = option(
        "auto",
        "Where the run trains: torch (PyTorch on CUDA or CPU) or mlx (Apple's MLX with mlx-lm: the Apple GPU, or the "
        "CPU on Linux, installed as mlx-lm with its cpu extra); auto = torch on a CUDA GPU, mlx on Apple Silicon with mlx installed, "
        "torch on the CPU otherwise.",
        group="Model",
        choices=BACKENDS,
    )
    gpus: int = option(
        1,
        "Devices to train on, one process each (data parallel through torch.distributed; gradients summed over "
        "the devices every step, so the global batch is micro_batch x grad_accumulation as on one device).",
        group="Model",
        bounds=at_least(1),
    )
    fsdp: bool = option(
        False,
        "Shard the model over the processes of a --gpus run (FSDP2 fully_shard per decoder layer), so each device "
        "holds 1/N of the weights, gradients and optimizer state: for a model that does not fit one device. "
        "Modes lora and full, backend torch; CUDA graphs are off under it.",
        group="Model",
    )
    # LoRA
    lora_r: int | None = option(None, "LoRA rank (default: the preset's, else 16).", group="LoRA", bounds=at_least(1))
    lora_alpha: float | None = option(
        None, "LoRA alpha (default: the preset's, else 2 x rank).", group="LoRA", bounds=positive()
    )
    lora_dropout: float = option(
        0.0,
        "Dropout on the LoRA input (0 keeps the fused fast path).",
        group="LoRA",
        bounds=Range(0, 1, high_open=True),
    )
    target_modules: str = option(
        "all-linear",
        "Layers that get adapters: all-linear, or a comma list such as q_proj,v_proj.",
        group="LoRA",
    )
    rslora: bool = option(False, "Rank-stabilised LoRA: scale by alpha/sqrt(r) instead of alpha/r.", group="LoRA")
    dora: bool = option(False, "Weight-decomposed LoRA (DoRA); slower, sometimes better at low rank.", group="LoRA")
    fp8: bool = option(
        False,
        "Store and multiply the frozen base weights of LoRA in FP8 (e4m3, one byte a weight, half of bf16; forward "
        "and input-gradient matmuls; activations scaled per token), the adapter, norms and loss staying bf16 / fp32: "
        "GPUs with FP8 tensor cores (Ada, Hopper, Blackwell). Mode lora (auto picks it), backend torch, bf16 "
        "compute; not with DoRA or FSDP.",
        group="LoRA",
    )
    # Preference methods
    orpo_beta: float = option(
        0.1,
        "ORPO: weight of the odds-ratio term added to the chosen answers' NLL.",
        group="Preference",
        bounds=positive(),
    )
    orpo_prompt_loss: bool = option(
        False,
        "ORPO: count the prompt tokens in the NLL term too (TRL's ORPOTrainer does; off trains on answers only).",
        group="Preference",
    )
    simpo_beta: float = option(
        2.0,
        "SimPO: scale of the length-normalised reward (the SimPO paper recommends 2 to 2.5).",
        group="Preference",
        bounds=positive(),
    )
    simpo_gamma: float = option(
        0.5,
        "SimPO: target reward margin, in reward units (loss = -log sigmoid(beta * margin - gamma)).",
        group="Preference",
        bounds=non_negative(),
    )
    simpo_alpha: float = option(
        0.0,
        "SimPO: weight of the chosen answers' NLL added to the loss (the SimPO paper's 0; TRL's CPOTrainer "
        "calls it cpo_alpha, default 1).",
        group="Preference",
        bounds=non_negative(),
    )
    kto_beta: float = option(
        0.1, "KTO: scale of the reward (log-ratio to the base model).", group="Preference", bounds=positive()
    )
    kto_desirable_weight: float | None = option(
        None,
        "KTO: loss weight of desirable rows (default: balanced from the label counts, so that "
        "desirable_weight x desirable rows = undesirable_weight x undesirable rows).",
        group="Preference",
        bounds=positive(),
    )
    kto_undesirable_weight: float | None = option(
        None,
        "KTO: loss weight of undesirable rows (default: balanced from the label counts).",
        group="Preference",
        bounds=positive(),
    )
    shared_prompt: bool = option(
        True,
        "ORPO/SimPO: run the prompt shared by a chosen and a rejected answer once for both (exact, fewer tokens).",
        group="Preference",
    )
    # Data shape
    max_seq_length: int | None = option(
        None,
        "Longest sample and packed-row length in tokens (default: the preset's context, else 2048; "
        "8192 with reasoning_trace).",
        group="Data",
        bounds=SEQ_LENGTH,
    )
    micro_batch: int = option(
        2, "Packed rows per micro-batch (halved automatically on out-of-memory).", group="Data", bounds=at_least(1)
    )
    grad_accumulation: int = option(
        4,
        "Micro-batches per optimizer step (doubled when the micro-batch is halved).",
        group="Data",
        bounds=at_least(1),
    )
    eval_split: float = option(
        0.0,
        "Fraction of packed rows held out for evaluation (0 = none).",
        group="Data",
        bounds=Range(0, 0.5, high_open=True),
    )
    eval_every: int = option(
        0, "Evaluate every N steps (0 = only at the end, when eval_split > 0).", group="Data", bounds=at_least(0)
    )
    # Optimisation
    learning_rate: float | None = option(
        None,
        "Peak learning rate (default: sft the preset's, else 2e-4; orpo 8e-6; simpo 5e-6; kto 5e-6).",
        bounds=Range(0, 1, low_open=True),
    )
    schedule: str = option("cosine", "Learning-rate schedule after warmup.", choices=SCHEDULES)
    warmup_ratio: float = option(0.03, "Warmup length as a fraction of the steps.", bounds=Range(0, 1))
    warmup_steps: int | None = option(None, "Warmup length in steps (overrides warmup_ratio).", bounds=at_least(0))
    weight_decay: float = option(0.0, "AdamW weight decay.", bounds=non_negative())
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this value (0 = no clipping).", bounds=non_negative())
    optimizer: str = option(
        "adamw", "adamw (fused), adamw_8bit or paged_adamw_8bit (bitsandbytes).", choices=OPTIMIZERS
    )
    seed: int = option(42, "Seed for initialisation, shuffling and dropout.", bounds=Range(0, 2**32 - 1, integer=True))
    gradient_checkpointing: str = option(
        "auto",
        "Recompute layer activations in backward to save memory: on (every layer), off, or auto (keep as "
        "many layers' activations as the card, or on the CPU the available RAM, holds; planned after the first step).",
        choices=CHECKPOINTING,
    )
    offload_activations: str = option(
        "auto",
        "Keep recomputed layers' inputs in pinned host memory between forward and backward (long contexts): on, "
        "off, or auto (only when the step would not fit the card otherwise, or after running out of memory with "
        "every layer recomputed; before halving the micro-batch). CUDA; on the CPU it only copies.",
        choices=CHECKPOINTING,
    )
    fused_kernels: bool = option(
        True,
        "Fused RMSNorm / SwiGLU / RoPE / cross-entropy kernels on CUDA (compiled once per run).",
    )
    cuda_graphs: bool = option(
        True,
        "Replay each micro-batch's forward and backward as a CUDA graph (LoRA / QLoRA; sft, orpo, simpo; "
        "no dropout), so the GPU never waits for Python to launch kernels.",
    )
    # Run and outputs
    output_dir: str | None = option(
        None, "Folder for checkpoints, adapter, metrics and plot (default: runs/run-<time>).", group="Run"
    )
    save_every: int = option(
        100, "Save a checkpoint every N steps (0 = only at the end).", group="Run", bounds=at_least(0)
    )
    keep_checkpoints: int = option(2, "How many recent checkpoints to keep.", group="Run", bounds=at_least(1))
    resume: bool = option(
        False,
        "Continue from the last checkpoint in output_dir (model, optimizer, data position, RNG).",
        group="Run",
    )
    resume_run: str | None = option(
        None,
        "Continue the recorded training run with this id (or unique prefix; `backprop runs list`) in its own "
        "output folder, as --resume does there.",
        group="Run",
    )
    overwrite: bool = option(
        False,
        "Start afresh in an output folder that holds an earlier run's checkpoints or adapter, deleting them "
        "first (without it such a folder is refused; --resume continues the earlier run instead).",
        group="Run",
    )
    log_every: int = option(1, "Write metrics every N steps.", group="Run", bounds=at_least(1))
    report_to: str = option(
        "auto",
        "Metric sinks besides metrics.jsonl: auto (TensorBoard if installed, W&B if installed and "
        "logged in), none, tensorboard, wandb.",
        group="Run",
        choices=REPORT_TO,
    )
    progress: bool = option(True, "Show a progress bar.", group="Run")
    max_gpu_temp: float = option(
        85.0,
        "Pause training while the GPU is hotter than this (deg C).",
        group="Run",
        bounds=Range(0, 120, low_open=True),
    )
    gpu_resume_temp: float = option(
        75.0, "Resume once the GPU has cooled to this (deg C).", group="Run", bounds=Range(0, 120, low_open=True)
    )
    max_gpu_pause: float = option(
        600.0,
        "Give up with RUNTIME_GPU_TEMPERATURE_CRITICAL after pausing this long (seconds).",
        group="Run",
        bounds=non_negative(),
    )

    def validate(self) -> TrainConfig:
        """Checks every field against its declared range, then the combinations, naming the first that is wrong."""
        check_fields(self)
        if self.method in PREFERENCE_METHODS and self.mode == "full":
            raise ConfigError(
                "CONFIG_INVALID_SETTING",
                f"method={self.method!r} with mode='full' is invalid: preference methods train a LoRA adapter "
                "for now; use mode='lora' or mode='qlora' (or 'auto')",
            )
        if self.gpu_resume_temp > self.max_gpu_temp:
            raise invalid("gpu_resume_temp", self.gpu_resume_temp, f"at most max_gpu_temp ({self.max_gpu_temp})")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise invalid("device", self.device, "auto, cuda, cuda:N or cpu")
        if self.dora and self.mode == "full":
            raise invalid("dora", self.dora, "off with mode=full (DoRA is an adapter)")
        if self.fp8:
            check_fp8_combination(self)
        if self.backend == "mlx":
            from backpropagate.train.mlx.support import check_supported

            check_supported(self)
        return self

    def target_module_list(self) -> str | list[str]:
        """Peft's form of `target_modules`."""
        if self.target_modules.strip() == "all-linear":
            return "all-linear"
        names = [n.strip() for n in self.target_modules.split(",") if n.strip()]
        if not names:
            raise invalid("target_modules", self.target_modules, "all-linear or a comma list of layer names")
        return names


if TYPE_CHECKING:
    from backpropagate.data.config import DataConfig


@dataclass(frozen=True)
class Settings:
    """A run's settings after resolution: what the user gave, filled from the preset, checked."""

    train: TrainConfig
    data: DataConfig
    preset: Preset | None


def resolve_settings(model: str, options: dict[str, Any]) -> Settings:
    """The one way options become settings, for `train`, `validate` and every other caller.

    Unknown names are refused; every value the user gave is checked against its field's
    range as given (never swapped); fields left unset come from the method, the preset of
    `model`, then the general defaults (`apply_preset`).
    """
    from backpropagate.data.config import DataConfig

    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    data_names = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(options) - train_names - data_names)
    if unknown:
        raise ConfigError(
            "CONFIG_INVALID_SETTING",
            f"unknown option(s) {', '.join(unknown)}; known options: {', '.join(sorted(train_names | data_names))}",
        )
    given = TrainConfig(**{k: v for k, v in options.items() if k in train_names})
    preset = find_preset(model)
    data_options = {k: v for k, v in options.items() if k in data_names and k != "max_seq_length"}
    train = apply_preset(given, preset, bool(data_options.get("reasoning_trace"))).validate()
    if train.resume_run is not None:
        from backpropagate.runs.resume import resume_settings

        train = resume_settings(train)
    assert train.max_seq_length is not None
    return Settings(train=train, data=DataConfig(max_seq_length=train.max_seq_length, **data_options), preset=preset)


def apply_preset(config: TrainConfig, preset: Preset | None, reasoning_trace: bool = False) -> TrainConfig:
    """Fills every unset (None) field from the method, the preset, then the general defaults.

    Only `None` means unset: a value the user gave, even 0, stays as given for `validate`
    to accept or refuse. The preset's learning rate is an SFT rate; preference methods use
    their own (`METHOD_LEARNING_RATES`). Reasoning-trace data defaults to a long context.
    """
    rank = config.lora_r if config.lora_r is not None else (preset.lora_r if preset else DEFAULT_LORA_R)
    if config.lora_alpha is not None:
        alpha = config.lora_alpha
    else:
        alpha = preset.lora_alpha if preset and config.lora_r is None else 2 * rank
    learning_rate = METHOD_LEARNING_RATES.get(config.method) or (
        preset.learning_rate if preset else DEFAULT_LEARNING_RATE
    )
    context = preset.max_seq_length if preset else DEFAULT_MAX_SEQ_LENGTH
    if reasoning_trace:
        context = REASONING_MAX_SEQ_LENGTH
    return dataclasses.replace(
        config,
        lora_r=rank,
        lora_alpha=alpha,
        learning_rate=config.learning_rate if config.learning_rate is not None else learning_rate,
        max_seq_length=config.max_seq_length if config.max_seq_length is not None else context,
    )


# Dataset kinds (see `PreparedDataset.kind`) each method trains on, and how to say so.
METHOD_DATA = {
    "sft": (
        ("sft",),
        "conversation, instruction or text rows (prompt/chosen/rejected pairs train with "
        "method='orpo' or 'simpo', prompt/completion/label rows with method='kto')",
    ),
    "orpo": (("preference",), "prompt/chosen/rejected rows"),
    "simpo": (("preference",), "prompt/chosen/rejected rows"),
    "kto": (("kto", "preference"), "prompt/completion/label rows (or prompt/chosen/rejected pairs)"),
}


def check_data_kind(kind: str, method: str) -> None:
    """Refuses data the method cannot train on (pairs for SFT, SFT rows for a preference method)."""
    kinds, needs = METHOD_DATA[method]
    if kind not in kinds:
        from backpropagate.errors import InputError

        raise InputError(
            "INPUT_DATASET_VALIDATION_FAILED", f"method={method!r} needs {needs}, but the dataset holds {kind} rows"
        )


def check_fp8_combination(config: TrainConfig) -> None:
    """Refuses `fp8` with the settings it does not combine with, naming the first."""
    clashes = {
        "mode": (config.mode not in ("auto", "lora"), "FP8 holds the base weights of a LoRA run (mode=lora)"),
        "dora": (config.dora, "DoRA reads the dense base weight for its norm"),
        "backend": (config.backend == "mlx", "the MLX rail has no FP8 matmul"),
        "fsdp": (config.fsdp, "FSDP shards the bf16 weights"),
    }
    for name, (clash, why) in clashes.items():
        if clash:
            raise ConfigError(
                "CONFIG_INVALID_SETTING",
                f"fp8=True with {name}={getattr(config, name)!r} is invalid: {why}",
                hint="Drop --fp8, or change that setting.",
            )
