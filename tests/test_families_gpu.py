"""Every family's CUDA path: packed rows through the GPU attention kernels, and QLoRA through `Trainer`.

The CPU tests check packing in fp32 against transformers; here the same folders run as a
user's GPU run does: bf16 weights, varlen attention (flash) for full-attention layers, the
per-sample path for Gemma 3's sliding windows and Qwen3.5's DeltaNet layers, fused kernels,
compiled steps and nf4 base weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from test_families import (
    ALL_FAMILIES,
    any_family_folder,
    packed_and_alone_losses,
    tiny_random_model,
    trained_on_chat_rows,
)

pytestmark = pytest.mark.gpu  # skipped without CUDA (conftest)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_packed_loss_equals_unpacked_in_bf16_on_cuda(family, tmp_path):
    """Each sample of a packed row gets its unpacked loss, to bf16's rounding."""
    folder = any_family_folder(family, tmp_path)
    model = tiny_random_model(folder).to("cuda", torch.bfloat16)
    packed, alone = packed_and_alone_losses(model, folder, tmp_path)
    np.testing.assert_allclose(packed, alone, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_qlora_trains_on_cuda(family, tmp_path):
    """The default mode as a user runs it: nf4 base, bf16 compute, fused kernels; the loss falls."""
    folder = any_family_folder(family, tmp_path)
    tiny_random_model(folder).save_pretrained(folder)
    result = trained_on_chat_rows(folder, tmp_path, mode="qlora", precision="auto", device="cuda")
    assert Path(result.adapter_dir, "adapter_model.safetensors").exists()
