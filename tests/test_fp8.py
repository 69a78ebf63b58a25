"""FP8 base weights for LoRA (`fp8=True`), on the CPU (products of the e4m3 values in fp32; CUDA runs `torch._scaled_mm`)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from backpropagate import Trainer
from backpropagate.config import TrainConfig
from backpropagate.errors import ConfigError
from backpropagate.train.torch import fp8
from backpropagate.trainer import TrainResult
from train_helpers import rule_dataset

FAST = dict(progress=False, report_to="none", precision="bf16", micro_batch=2, grad_accumulation=2, learning_rate=1e-2)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().float() - want.float()).norm() / want.float().norm())


@pytest.fixture(scope="module")
def dataset():
    return rule_dataset(vocab=300, samples=90, max_seq_length=96, seed=0)


def test_fp8_matmuls_give_the_bf16_products_within_e4m3_rounding():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=g)
    x = torch.randn(10, 64, generator=g).to(torch.bfloat16).requires_grad_(True)
    quantized = fp8.Fp8Weight.of(weight)
    assert quantized.data.dtype == torch.float8_e4m3fn and quantized.data.shape == (48, 64)
    assert quantized.scale.shape == ()
    y = fp8._Fp8Linear.apply(x, quantized, None)
    dy = torch.randn(10, 48, generator=g).to(torch.bfloat16)
    y.backward(dy)
    # e4m3 keeps 3 mantissa bits: about 3% per element, less once a product sums 48-64 of them.
    assert relative_error(y, x.detach().float() @ weight.t()) < 0.05
    assert relative_error(x.grad, dy.float() @ weight) < 0.05


def test_both_matmuls_read_one_e4m3_copy_of_the_weight():
    """One byte a weight: the input gradient multiplies the same quantized values as the forward, transposed.

    Both contracted dimensions (200 and 144) end in a partial block of 128.
    """
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(144, 200, generator=g) * torch.logspace(-2, 0, 200)  # columns of very different ranges
    quantized = fp8.Fp8Weight.of(weight)
    assert quantized.data.element_size() * quantized.data.numel() == weight.numel()
    dequantized = quantized.data.float() * quantized.scale
    assert relative_error(dequantized, weight) < 0.04
    x = torch.randn(8, 200, generator=g).to(torch.bfloat16)
    dy = torch.randn(8, 144, generator=g).to(torch.bfloat16)
    for product, operand, matrix in (
        (quantized.forward(x, torch.float32), x, dequantized.t()),
        (quantized.input_grad(dy, torch.float32), dy, dequantized),
    ):
        values, scale = fp8.blocks_in_fp8(operand)
        assert scale.shape == (8, 2)
        torch.testing.assert_close(product, fp8.dequantized(values, scale) @ matrix)


def test_block_scales_keep_an_outlier_from_coarsening_the_rest_of_its_token():
    """An outlier channel (here 300,000x) pushes the token's other values into e4m3's subnormals under one scale per token.

    Scaled per block, only the outlier's own block is coarsened.
    """
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 256, generator=g)
    x[:, 3] = 3e5
    rest = slice(128, 256)
    by_token = fp8.dequantized(*fp8.rows_in_fp8(x))
    by_block = fp8.dequantized(*fp8.blocks_in_fp8(x))
    assert relative_error(by_block[:, rest], x[:, rest]) < 0.04
    assert relative_error(by_token[:, rest], x[:, rest]) > 0.2


def test_per_token_scales_where_cublas_has_no_block_scales(monkeypatch):
    """The fallback layout: one scale per token, the weight's repeated per output."""
    monkeypatch.setattr(fp8, "layout_on", lambda device: fp8.Layout(None, partial=False))
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(48, 256, generator=g)
    quantized = fp8.Fp8Weight.of(weight)
    assert quantized.forward_scales.tokens.shape == (1, 48) and quantized.backward_scales.tokens.shape == (1, 256)
    assert quantized.forward_scales.blocks is None
    x = torch.randn(8, 256, generator=g).to(torch.bfloat16)
    values, scale = fp8.rows_in_fp8(x)
    want = fp8.dequantized(values, scale) @ (quantized.data.float() * quantized.scale).t()
    torch.testing.assert_close(quantized.forward(x, torch.float32), want)


def test_products_are_block_scaled_where_cublas_takes_their_shape():
    """A row of one block is the per-token case; partial last blocks only where the card computes them right."""
    full = fp8.Layout(fp8.BLOCKS, partial=True)
    assert full.blocks_for(3584) and full.blocks_for(576) and not full.blocks_for(128)
    assert not fp8.Layout(fp8.BLOCKS, partial=False).blocks_for(576)
    assert not fp8.Layout(None, partial=False).blocks_for(3584)
    assert fp8.quantize(torch.randn(7, 128))[1].shape == (7, 1)


def test_token_counts_cublas_refuses_are_padded_and_the_padding_dropped():
    """7 tokens are quantized as 8 (a row of zeros added): the product has 7 rows, each as if alone."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 200, generator=g)
    values, scales = fp8.quantize(x)
    assert values.shape == (8, 200) and scales.shape == (8, 2) and (values[7].float() == 0).all()
    weight = fp8.Fp8Weight.of(torch.randn(48, 200, generator=g))
    product = weight.forward(x, torch.float32)
    want = fp8.dequantized(*fp8.blocks_in_fp8(x)) @ (weight.data.float() * weight.scale).t()
    assert product.shape == (7, 48)
    torch.testing.assert_close(product, want)


def test_weight_scales_take_the_layouts_scaled_mm_checks_for():
    """128 x 128 blocks of W [n, k], read as scale_b.t(): [ceil(n/128), ceil(k/128)], rows unpadded or padded to 4.

    Whatever stride cuBLAS reads them with, rows and columns padded to 4 stay inside a buffer of the scale.
    """
    scale = torch.tensor(0.5)
    for layout, stride in ((fp8.BLOCKS, 6), (fp8.BLOCKS_PADDED, 8)):
        grid = fp8.weight_scales(scale, 300, 700, layout).t()
        assert grid.shape == (3, 6) and grid.stride() == (stride, 1) and (grid == 0.5).all()
        room = torch.tensor([], dtype=grid.dtype).set_(grid.untyped_storage())
        assert room.numel() >= 4 * 8 and (room == 0.5).all()


TRANSPOSE_CHECK = """
import torch
from backpropagate.train.torch import byte_transpose
g = torch.Generator().manual_seed(0)
for shape in ((200, 136), (64, 64), (16, 48), (130, 70)):
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)
    y = byte_transpose.transposed_by_kernel(x)
    assert y.dtype == x.dtype and y.is_contiguous(), shape
    assert torch.equal(y.view(torch.uint8), x.view(torch.uint8).t()), shape
"""


def test_the_transpose_kernel_moves_every_byte_of_partial_tiles_too():
    """The CUDA kernel, run by Triton's interpreter on the CPU: shapes that fill tiles and shapes that do not."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", TRANSPOSE_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


ROWS_CHECK = """
import torch
from backpropagate.train.torch import fp8, fp8_rows
g = torch.Generator().manual_seed(0)
for rows, cols, dtype in ((5, 3584, torch.bfloat16), (3, 18944, torch.bfloat16), (4, 100, torch.float32), (0, 64, torch.bfloat16)):
    x = (torch.randn(rows, cols, generator=g) * torch.logspace(-3, 3, cols)).to(dtype)
    if rows:
        x[0] = 0  # a row of zeros: the smallest scale, no division by zero
    scaled, scale = fp8_rows.quantized_by_kernel(x, torch.float32)
    want = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / fp8.FP8_MAX
    assert scaled.shape == (rows, cols) and scale.shape == (rows, 1), (rows, cols)
    assert torch.equal(scale, want) and torch.equal(scale, fp8.rows_in_fp8(x)[1]), (rows, cols)
    assert torch.equal(scaled, x.float() / want), (rows, cols)
assert fp8_rows.fits(32768) and not fp8_rows.fits(32769)
"""

BLOCKS_CHECK = """
import torch
from backpropagate.train.torch import fp8, fp8_rows
g = torch.Generator().manual_seed(0)
for rows, cols, dtype in ((70, 3584, torch.bfloat16), (33, 576, torch.bfloat16), (5, 100, torch.float32), (0, 256, torch.bfloat16)):
    x = (torch.randn(rows, cols, generator=g) * torch.logspace(-3, 3, cols)).to(dtype)
    if rows:
        x[0, :128] = 0  # a block of zeros: the smallest scale, no division by zero
    scaled, scale = fp8_rows.blocks_by_kernel(x, fp8.BLOCK, torch.float32)
    blocks = -(-cols // fp8.BLOCK)
    assert scaled.shape == (rows, cols) and scale.shape == (rows, blocks), (rows, cols)
    assert rows == 0 or scale.stride() == (1, rows), (rows, cols)  # token-contiguous, as cuBLAS reads them
    assert torch.equal(scale, fp8.blocks_in_fp8(x)[1]), (rows, cols)
    assert torch.equal(scaled, x.float() / scale.repeat_interleave(fp8.BLOCK, 1)[:, :cols]), (rows, cols)
"""


def test_the_row_kernel_quantizes_as_the_plain_operations_do():
    """The CUDA kernel, run by Triton's interpreter on the CPU, before its e4m3 cast (checked on the card).

    A 7B's widths, one that fills no block, no rows.
    """
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", ROWS_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_the_block_kernel_quantizes_as_the_plain_operations_do():
    """The CUDA kernel, run by Triton's interpreter on the CPU, before its e4m3 cast (checked on the card).

    Tiles of rows partly filled, a partial last block (576 = 4.5 blocks), no rows.
    """
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", BLOCKS_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_a_row_of_zeros_quantizes_without_dividing_by_zero():
    values, scale = fp8.quantize_rows(torch.zeros(2, 32))
    assert torch.isfinite(values.float()).all() and (values.float() == 0).all() and (scale > 0).all()


def test_layers_reading_one_input_quantize_it_once(monkeypatch):
    """q, k and v read one tensor: it is quantized once, again after an in-place change, and its copy is dropped with it."""
    g = torch.Generator().manual_seed(0)
    weights = [fp8.Fp8Weight.of(torch.randn(16, 32, generator=g)) for _ in range(3)]
    quantized = []
    monkeypatch.setattr(fp8, "quantize", lambda x: quantized.append(x.shape) or fp8.blocks_in_fp8(x))
    x = torch.randn(2, 5, 32, generator=g).to(torch.bfloat16)
    products = [w.forward(x, torch.bfloat16) for w in weights]
    assert quantized == [(10, 32)]
    for w, y in zip(weights, products, strict=True):
        assert torch.equal(y, fp8._Fp8Linear.apply(x.clone(), w, None).reshape(10, 16))
    x.mul_(2)
    weights[0].forward(x, torch.bfloat16)
    assert len(quantized) == 5  # the in-place change, then each clone above
    del x
    assert fp8._LAST_INPUT.quantized is None


def trained(options: dict, dataset, path, steps: int = 12) -> tuple[Trainer, TrainResult]:
    trainer = Trainer("tiny-llama", device="cpu", output_dir=str(path), **FAST, **options)
    return trainer, trainer.train(dataset, steps=steps)


def test_fp8_lora_follows_the_bf16_curve_with_its_base_weights_in_fp8(tiny_llama, dataset, tmp_path):
    _, bf16 = trained({}, dataset, tmp_path / "bf16")
    trainer, result = trained({"fp8": True}, dataset, tmp_path / "fp8")
    curves = {name: np.array([loss for _, loss in r.losses]) for name, r in (("bf16", bf16), ("fp8", result))}
    assert curves["fp8"][-3:].mean() < curves["fp8"][:3].mean() - 0.2, curves
    assert np.abs(curves["fp8"] - curves["bf16"]).max() < 0.05 * curves["bf16"].max(), curves
    layers = [m for m in trainer._trained.model.modules() if fp8.of(m) is not None]
    assert len(layers) == 2 * 7  # every adapted linear layer of both blocks
    assert all(m.weight.stride() == (0, 0) for m in layers)  # the bf16 copy is gone
    assert {f"fp8[{len(layers)}]", "fp8_scales[1x128]", "fp8_rounding[gptq]"} <= set(result.features)
    assert (result.adapter_dir / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("options", [{"lora_dropout": 0.1}, {"method": "kto"}])
def test_paths_outside_the_fused_layer_read_the_fp8_weights(tiny_llama, tmp_path, options):
    """Dropout runs peft's own LoRA forward and KTO's reference pass disables the adapter: both call the base layer."""
    if options.get("method") == "kto":
        from backpropagate.examples import example_path

        data = example_path("kto")
    else:
        data = rule_dataset(vocab=300, samples=40, max_seq_length=96, seed=1)
    _, result = trained({"fp8": True, **options}, data, tmp_path / "run", steps=2)
    assert result.steps == 2 and all(np.isfinite(loss) for _, loss in result.losses)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"mode": "qlora"}, "mode='qlora'"),
        ({"mode": "full"}, "mode='full'"),
        ({"dora": True}, "dora=True"),
        ({"backend": "mlx"}, "backend='mlx'"),
        ({"fsdp": True, "gpus": 2}, "fsdp=True"),
    ],
)
def test_fp8_is_refused_with_settings_it_does_not_combine_with(options, named):
    with pytest.raises(ConfigError) as err:
        TrainConfig(fp8=True, **options).validate()
    assert err.value.code == "CONFIG_INVALID_SETTING" and named in err.value.message


def test_fp8_needs_bf16_compute(tiny_llama):
    with pytest.raises(ConfigError) as err:
        Trainer("tiny-llama", device="cpu", fp8=True, precision="fp32", progress=False).train(
            rule_dataset(vocab=300, samples=8), steps=1
        )
    assert err.value.code == "CONFIG_INVALID_SETTING" and "bf16" in err.value.message


def test_fp8_is_refused_on_a_gpu_without_fp8_tensor_cores(monkeypatch):
    """No GPU here: the two device queries answer as an A100 (8.0) and an H100 (9.0) would."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ConfigError) as err:
        fp8.check_supported(torch.device("cuda"), torch.bfloat16)
    assert "A100" in err.value.message and "8.9" in err.value.message
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fp8.check_supported(torch.device("cuda"), torch.bfloat16)
