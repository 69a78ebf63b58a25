"""Loading an evaluation target for inference, in the form the training loop's own evaluation runs on."""

from __future__ import annotations

import warnings

from backpropagate.errors import InputError
from backpropagate.evaluate.target import EvalTarget
from backpropagate.log import quiet_bitsandbytes_import
from backpropagate.train.torch.loading import TrainingModel, load_base_model, resolve_device
from backpropagate.train.torch.precision import compute_dtype_for


def load_for_eval(target: EvalTarget, device: str = "auto") -> TrainingModel:
    """The target's base model (bf16 on CUDA, fp32 on CPU) with its adapter applied, in eval mode."""
    from transformers.utils import logging as hf_logging

    where = resolve_device(device)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per load would bury the comparison table
    try:
        model = load_base_model(target.model_dir, "lora", where)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if target.adapter_dir is not None:
        with quiet_bitsandbytes_import():
            from peft import PeftModel

        try:
            # peft calls a transformers alias that is deprecated, and imports bitsandbytes here (0.22+)
            with warnings.catch_warnings(), quiet_bitsandbytes_import():
                warnings.filterwarnings("ignore", category=FutureWarning)
                model = PeftModel.from_pretrained(model, target.adapter_dir)
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise InputError(
                "INPUT_ADAPTER_INVALID", f"{target.adapter_dir}: cannot be applied to {target.model_dir} ({exc})"
            ) from exc
    model.eval()
    return TrainingModel(
        model=model,
        device=where,
        mode="lora" if target.adapter_dir is not None else "full",
        compute_dtype=compute_dtype_for(where),
        autocast=False,
        num_params=sum(p.numel() for p in model.parameters()),
    )
