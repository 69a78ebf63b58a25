"""The loss's log-probability row kernel (`train/torch/logprob_rows.py`) against the plain operations CUDA compiles."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backpropagate.train.torch import fused, logprob_rows, losses

# Run in a subprocess: the interpreter must be chosen before Triton compiles anything.
CHECK = (
    f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_logprob_rows as t; t.interpreted()"
)


def bf16_steps(got: torch.Tensor, want: torch.Tensor) -> int:
    """How many bf16 values apart two bf16 tensors are at most (+0 and -0 count as one value)."""

    def order(t: torch.Tensor) -> torch.Tensor:
        bits = t.view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return int((order(got) - order(want)).abs().max()) if got.numel() else 0


def interpreted() -> None:
    """What the interpreter checks: fp32 and bf16, blocks filled and not, several blocks a row, strided rows, no rows."""
    g = torch.Generator().manual_seed(0)
    for rows, cols, block in ((3, 100, 32), (3, 100, 128), (4, 5000, 1024), (2, 2048, 512), (0, 64, 32)):
        for dtype in (torch.float32, torch.bfloat16):
            logits = (4 * torch.randn(rows, cols + 3, generator=g)).to(dtype)[:, 1 : cols + 1]  # rows cols + 3 apart
            targets = torch.randint(0, cols, (rows,), generator=g)
            targets[:2] = torch.tensor([0, cols - 1])[: min(rows, 2)]  # the first and the last column
            logp, grad = logprob_rows.logprob_and_grad_by_kernel(logits, targets, block=block, warps=4)
            want_logp, want_grad = losses._logprob_and_grad(logits, targets)
            case = str((rows, cols, block, dtype))
            assert logp.dtype == torch.float32 and logp.shape == (rows,), case
            assert grad.dtype == dtype and grad.shape == (rows, cols), case
            torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-6, msg=case)
            only = logprob_rows.logprob_only_by_kernel(logits, targets, block=block, warps=4)
            torch.testing.assert_close(only, losses._logprob_only(logits, targets), rtol=1e-5, atol=1e-6, msg=case)
            if dtype == torch.bfloat16:
                assert bf16_steps(grad, want_grad) <= 1, case
            else:
                torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7, msg=case)


def test_the_row_kernel_computes_what_the_plain_operations_do():
    """The CUDA kernel, run by Triton's interpreter on the CPU."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_the_loss_takes_the_kernel_first_and_cpu_tensors_the_plain_path():
    """The kernel leads, the compiled function stays behind it; CPU tensors go straight to the plain function."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 40, generator=g)
    targets = torch.randint(0, 40, (5,), generator=g)
    both, only = fused.kernel("logprob_and_grad"), fused.kernel("logprob_only")
    assert both.fast is logprob_rows.logprob_and_grad_by_kernel and only.fast is logprob_rows.logprob_only_by_kernel
    for got, want in zip(both(logits, targets), losses._logprob_and_grad(logits, targets), strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(only(logits, targets), losses._logprob_only(logits, targets))


@pytest.mark.gpu  # skipped without CUDA (conftest)
def test_the_row_kernel_computes_what_the_compiled_kernel_does_on_a_chunk_of_a_large_vocabulary():
    """A chunk as the loss walks it (832 positions of Qwen2.5's 152,064 tokens, bf16), against the compiled path."""
    g = torch.Generator(device="cuda").manual_seed(0)
    rows, cols = 832, 152064
    logits = (4 * torch.randn(rows, cols, generator=g, device="cuda")).to(torch.bfloat16)
    targets = torch.randint(0, cols, (rows,), generator=g, device="cuda")
    targets[:2] = torch.tensor([0, cols - 1])
    both, only = fused.kernel("logprob_and_grad"), fused.kernel("logprob_only")
    logp, grad = both(logits, targets)
    want_logp, want_grad = both.plain(logits, targets)
    torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-5)
    assert grad.dtype == torch.bfloat16 and bf16_steps(grad, want_grad) <= 1
    torch.testing.assert_close(only(logits, targets), only.plain(logits, targets), rtol=1e-5, atol=1e-5)
    assert both.fast is not None and only.fast is not None  # neither fell back to the compiled kernel
