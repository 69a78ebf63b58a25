"""Training settings: one dataclass whose field docs are also the `backprop train` help.

Every option of `Trainer(model, **options)` is a field of `TrainConfig`, and the CLI
builds one flag per field from the same metadata (`cli/options.py`), so the API, the
CLI and their documentation cannot drift apart. Fields left at `None` are filled from
the model's preset (rank, alpha, learning rate, context) or a general default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from backpropagate.errors import ConfigError

MODES = ("auto", "lora", "qlora", "full")
METHODS = ("sft", "orpo", "simpo", "kto")
PREFERENCE_METHODS = ("orpo", "simpo", "kto")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
CHECKPOINTING = ("auto", "on", "off")
REPORT_TO = ("auto", "none", "tensorboard", "wandb", "tensorboard,wandb")

# Used when neither the user nor a preset sets them.
DEFAULT_LORA_R = 16
DEFAULT_LORA_ALPHA = 32
DEFAULT_LEARNING_RATE = 2e-4
DEFAULT_MAX_SEQ_LENGTH = 2048
# Reasoning traces are long: their default context, unless max_seq_length is set.
REASONING_MAX_SEQ_LENGTH = 8192
# Default peak learning rates of the preference methods (LoRA), used unless learning_rate is set:
# ORPO's paper value; 5e-6 is the usual LoRA rate for the reference-scaled SimPO and KTO objectives.
METHOD_LEARNING_RATES = {"orpo": 8e-6, "simpo": 5e-6, "kto": 5e-6}


def option(default: Any, help: str, *, group: str = "Training", choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field carrying its CLI help text, help panel and allowed values."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices})


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
    # LoRA
    lora_r: int | None = option(None, "LoRA rank (default: the preset's, else 16).", group="LoRA")
    lora_alpha: float | None = option(None, "LoRA alpha (default: the preset's, else 2 x rank).", group="LoRA")
    lora_dropout: float = option(0.0, "Dropout on the LoRA input (0 keeps the fused fast path).", group="LoRA")
    target_modules: str = option(
        "all-linear",
        "Layers that get adapters: all-linear, or a comma list such as q_proj,v_proj.",
        group="LoRA",
    )
    rslora: bool = option(False, "Rank-stabilised LoRA: scale by alpha/sqrt(r) instead of alpha/r.", group="LoRA")
    dora: bool = option(False, "Weight-decomposed LoRA (DoRA); slower, sometimes better at low rank.", group="LoRA")
    # Preference methods
    orpo_beta: float = option(
        0.1, "ORPO: weight of the odds-ratio term added to the chosen answers' NLL.", group="Preference"
    )
    orpo_prompt_loss: bool = option(
        False,
        "ORPO: count the prompt tokens in the NLL term too (TRL's ORPOTrainer does; off trains on answers only).",
        group="Preference",
    )
    simpo_beta: float = option(
        2.0, "SimPO: scale of the length-normalised reward (the SimPO paper recommends 2 to 2.5).", group="Preference"
    )
    simpo_gamma: float = option(
        0.5,
        "SimPO: target reward margin, in reward units (loss = -log sigmoid(beta * margin - gamma)).",
        group="Preference",
    )
    simpo_alpha: float = option(
        0.0,
        "SimPO: weight of the chosen answers' NLL added to the loss (the SimPO paper's 0; TRL's CPOTrainer "
        "calls it cpo_alpha, default 1).",
        group="Preference",
    )
    kto_beta: float = option(0.1, "KTO: scale of the reward (log-ratio to the base model).", group="Preference")
    kto_desirable_weight: float | None = option(
        None,
        "KTO: loss weight of desirable rows (default: balanced from the label counts, so that "
        "desirable_weight x desirable rows = undesirable_weight x undesirable rows).",
        group="Preference",
    )
    kto_undesirable_weight: float | None = option(
        None, "KTO: loss weight of undesirable rows (default: balanced from the label counts).", group="Preference"
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
    )
    micro_batch: int = option(2, "Packed rows per micro-batch (halved automatically on out-of-memory).", group="Data")
    grad_accumulation: int = option(
        4, "Micro-batches per optimizer step (doubled when the micro-batch is halved).", group="Data"
    )
    eval_split: float = option(0.0, "Fraction of packed rows held out for evaluation (0 = none).", group="Data")
    eval_every: int = option(0, "Evaluate every N steps (0 = only at the end, when eval_split > 0).", group="Data")
    # Optimisation
    learning_rate: float | None = option(
        None, "Peak learning rate (default: sft the preset's, else 2e-4; orpo 8e-6; simpo 5e-6; kto 5e-6)."
    )
    schedule: str = option("cosine", "Learning-rate schedule after warmup.", choices=SCHEDULES)
    warmup_ratio: float = option(0.03, "Warmup length as a fraction of the steps.")
    warmup_steps: int | None = option(None, "Warmup length in steps (overrides warmup_ratio).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this value (0 = no clipping).")
    optimizer: str = option(
        "adamw", "adamw (fused), adamw_8bit or paged_adamw_8bit (bitsandbytes).", choices=OPTIMIZERS
    )
    seed: int = option(42, "Seed for initialisation, shuffling and dropout.")
    gradient_checkpointing: str = option(
        "auto",
        "Recompute layer activations in backward to save memory: on (every layer), off, or auto (on CUDA, "
        "keep as many layers' activations as the card holds, measured after the first step).",
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
    save_every: int = option(100, "Save a checkpoint every N steps (0 = only at the end).", group="Run")
    keep_checkpoints: int = option(2, "How many recent checkpoints to keep.", group="Run")
    resume: bool = option(
        False,
        "Continue from the last checkpoint in output_dir (model, optimizer, data position, RNG).",
        group="Run",
    )
    log_every: int = option(1, "Write metrics every N steps.", group="Run")
    report_to: str = option(
        "auto",
        "Metric sinks besides metrics.jsonl: auto (TensorBoard if installed, W&B if installed and "
        "logged in), none, tensorboard, wandb.",
        group="Run",
        choices=REPORT_TO,
    )
    progress: bool = option(True, "Show a progress bar.", group="Run")
    max_gpu_temp: float = option(85.0, "Pause training while the GPU is hotter than this (deg C).", group="Run")
    gpu_resume_temp: float = option(75.0, "Resume once the GPU has cooled to this (deg C).", group="Run")
    max_gpu_pause: float = option(
        600.0, "Give up with RUNTIME_GPU_TEMPERATURE_CRITICAL after pausing this long (seconds).", group="Run"
    )

    def validate(self) -> TrainConfig:
        """Checks every field, naming the first one that is wrong."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise _invalid(f.name, value, "one of " + ", ".join(choices))
        if self.method in PREFERENCE_METHODS and self.mode == "full":
            raise ConfigError(
                "CONFIG_INVALID_SETTING",
                f"method={self.method!r} with mode='full' is invalid: preference methods train a LoRA adapter "
                "for now; use mode='lora' or mode='qlora' (or 'auto')",
            )
        positive = ("micro_batch", "grad_accumulation", "keep_checkpoints", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise _invalid(name, getattr(self, name), "at least 1")
        for name in ("orpo_beta", "simpo_beta", "kto_beta"):
            if not getattr(self, name) > 0:
                raise _invalid(name, getattr(self, name), "more than 0")
        for name in ("kto_desirable_weight", "kto_undesirable_weight"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise _invalid(name, value, "more than 0")
        for name in ("lora_r", "max_seq_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise _invalid(name, value, "at least 1")
        for name in ("save_every", "eval_every", "weight_decay", "max_grad_norm", "warmup_ratio", "simpo_alpha"):
            if getattr(self, name) < 0:
                raise _invalid(name, getattr(self, name), "0 or more")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise _invalid("learning_rate", self.learning_rate, "more than 0")
        if not 0 <= self.lora_dropout < 1:
            raise _invalid("lora_dropout", self.lora_dropout, "in [0, 1)")
        if not 0 <= self.eval_split < 0.5:
            raise _invalid("eval_split", self.eval_split, "in [0, 0.5)")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise _invalid("warmup_steps", self.warmup_steps, "0 or more")
        if self.gpu_resume_temp > self.max_gpu_temp:
            raise _invalid("gpu_resume_temp", self.gpu_resume_temp, f"at most max_gpu_temp ({self.max_gpu_temp})")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise _invalid("device", self.device, "auto, cuda, cuda:N or cpu")
        if self.dora and self.mode == "full":
            raise _invalid("dora", self.dora, "off with mode=full (DoRA is an adapter)")
        return self

    def target_module_list(self) -> str | list[str]:
        """Peft's form of `target_modules`."""
        if self.target_modules.strip() == "all-linear":
            return "all-linear"
        names = [n.strip() for n in self.target_modules.split(",") if n.strip()]
        if not names:
            raise _invalid("target_modules", self.target_modules, "all-linear or a comma list of layer names")
        return names

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TrainConfig:
        """Builds a config from keyword options, refusing unknown names."""
        from backpropagate.data import DataConfig

        known = {f.name for f in dataclasses.fields(cls)} | {f.name for f in dataclasses.fields(DataConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                "CONFIG_INVALID_SETTING",
                f"unknown option(s) {', '.join(unknown)}; known options: {', '.join(sorted(known))}",
            )
        return cls(**{k: v for k, v in options.items() if k in {f.name for f in dataclasses.fields(cls)}})


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


def _invalid(name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError("CONFIG_INVALID_SETTING", f"{name}={value!r} is invalid: expected {expected}")
