"""Every family's CUDA path: packed rows through the GPU attention kernels, and QLoRA through `Trainer`.

The CPU tests check packing in fp32 against transformers; here the same folders run as a
user's GPU run does: bf16 weights, varlen attention (flash) for full-attention layers, flex
attention for Gemma 3's sliding windows, Gemma 2's capped scores under the block mask, the
varlen delta-rule kernel for Qwen3.5's DeltaNet layers where it runs, fused kernels, compiled
steps and nf4 base weights.
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


def test_linear_attention_varlen_kernel_gives_each_sample_its_own_output(tmp_path):
    """flash-linear-attention's varlen delta rule over a packed row = transformers' layer on each sample."""
    pytest.importorskip("fla")
    from backpropagate.train.torch.linear_attention import (
        linear_attention_layers,
        packed_forward,
        varlen_kernel_available,
    )

    if not varlen_kernel_available(torch.device("cuda")):
        pytest.skip("flash-linear-attention refuses this GPU with this Triton")
    model = tiny_random_model(any_family_folder("qwen3.5", tmp_path)).to("cuda", torch.bfloat16)
    layer = linear_attention_layers(model)[0]
    torch.manual_seed(0)
    hidden = torch.randn(1, 300, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    bounds = [0, 100, 101, 250, 300]
    packed = packed_forward(layer, hidden, torch.tensor(bounds, device="cuda", dtype=torch.int32))
    alone = torch.cat(
        [layer(hidden_states=hidden[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)], dim=1
    )
    torch.testing.assert_close(packed.float(), alone.float(), rtol=3e-2, atol=3e-2)
