"""The kernel that reads a LoRA layer's output gradient once computes both products the two matmuls do."""

import os
import subprocess
import sys

import pytest
import torch

GRADS_CHECK = """
import torch
from backpropagate.train.torch import lora_grads
g = torch.Generator().manual_seed(0)
# (tokens, outputs, rank, width of the tensor the rank-r product is a column slice of): spans that
# fill tiles and that do not, several token blocks and output spans, a rank below the padded 16.
for tokens, outputs, rank, wide in ((300, 200, 16, 48), (256, 64, 8, 8), (5, 130, 32, 32), (513, 70, 16, 16)):
    dy = torch.randn(tokens, outputs, generator=g).half()
    b = (torch.randn(outputs, rank, generator=g) * 0.1).half()
    low = torch.randn(tokens, wide, generator=g).half()[:, :rank]
    d_low, d_b = lora_grads.grads_by_kernel(dy, b, low)
    assert d_low.dtype == torch.float16 and d_b.dtype == torch.float32
    assert d_low.shape == (tokens, rank) and d_b.shape == (outputs, rank)
    torch.testing.assert_close(d_low.float(), dy.float() @ b.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(d_b, dy.float().t() @ low.float(), rtol=1e-4, atol=1e-3)
# Training takes it for wide outputs only (a 7B's gate and up), 16-bit, up to MAX_TOKENS tokens.
wide, low = torch.zeros(8, lora_grads.MIN_OUTPUTS).half(), torch.zeros(8, 16).half()
assert lora_grads.fits(wide, low) and not lora_grads.fits(wide[:, 1:].contiguous(), low)
assert not lora_grads.fits(wide.float(), low.float())
assert not lora_grads.fits(torch.zeros(lora_grads.MAX_TOKENS + 1, lora_grads.MIN_OUTPUTS).half(), low)
"""


def test_the_kernel_computes_both_products_of_the_output_gradient():
    """Triton's interpreter on the CPU, in fp16: its dot of bf16 operands multiplies their bits (bf16 is checked on the card)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", GRADS_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.gpu
@pytest.mark.parametrize(("tokens", "outputs", "stacked"), [(8192, 18944, 32), (8192, 512, 48), (300, 3584, 16)])
def test_the_kernel_equals_two_matmuls_on_cuda(tokens, outputs, stacked):
    from backpropagate.train.torch import lora_fused, lora_grads

    g = torch.Generator(device="cuda").manual_seed(0)
    dy = torch.randn(tokens, outputs, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(outputs, 16, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05
    low = torch.randn(tokens, stacked, device="cuda", dtype=torch.bfloat16, generator=g)[:, :16]
    assert lora_grads.fits(dy, low) == (outputs >= lora_grads.MIN_OUTPUTS)
    got = lora_grads.grads_by_kernel(dy, b, low)
    want = lora_fused._two_products(dy, b, low)
    for ours, theirs in zip(got, want, strict=True):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2 * float(theirs.abs().max()))
