"""FP8 weights rounded for the training data's inputs (GPTQ onto the e4m3 grid)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from backpropagate.config import TrainConfig
from backpropagate.train.torch import fp8, fp8_gptq, loading
from backpropagate.train.torch.loop import calibration_ids, split_rows
from train_helpers import rule_dataset


def scaled(weight: torch.Tensor) -> torch.Tensor:
    """`weight` in e4m3's units: its tensor scale maps the absolute maximum to 448, as `fp8` does."""
    return weight / (weight.abs().amax() / fp8.FP8_MAX)


def correlated_inputs(k: int, seed: int):
    """Draws of inputs whose channels correlate and carry offsets, as a layer's inputs do."""
    g = torch.Generator().manual_seed(seed)
    mix, offset = torch.randn(k, k, generator=g) * 0.1, torch.randn(k, generator=g) * 2
    return lambda rows: torch.randn(rows, k, generator=g) @ mix + offset


def test_rounding_for_the_inputs_halves_the_products_error_on_inputs_like_them():
    draw = correlated_inputs(320, seed=0)
    seen, unseen = draw(4096), draw(2048)
    values = scaled(torch.randn(96, 320, generator=torch.Generator().manual_seed(1)))
    rounded = fp8_gptq.rounded(values, fp8_gptq.upper_inverse(seen.t() @ seen))
    assert torch.equal(fp8_gptq.nearest(rounded), rounded)  # every value is an e4m3 value

    def error(q):
        return float((unseen @ (values - q).t()).norm() / (unseen @ values.t()).norm())

    assert error(rounded) < 0.6 * error(fp8_gptq.nearest(values)), (error(rounded), error(fp8_gptq.nearest(values)))


def test_uncorrelated_inputs_and_columns_never_reached_keep_the_nearest_values():
    values = scaled(torch.randn(64, 256, generator=torch.Generator().manual_seed(2)))
    nearest = fp8_gptq.nearest(values)
    assert torch.equal(fp8_gptq.rounded(values, fp8_gptq.upper_inverse(torch.eye(256))), nearest)
    seen = correlated_inputs(256, seed=3)(1024)
    seen[:, 200:] = 0  # channels the calibration tokens never reach
    rounded = fp8_gptq.rounded(values, fp8_gptq.upper_inverse(seen.t() @ seen))
    assert torch.equal(rounded[:, 200:], nearest[:, 200:])
    assert not torch.equal(rounded[:, :200], nearest[:, :200])


KERNEL_CHECK = """
import torch
from backpropagate.train.torch import fp8_gptq
g = torch.Generator().manual_seed(0)
# e4m3's nearest values in fp32 arithmetic: every code's neighbourhood, ties, subnormals, saturation
codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
codes = codes[torch.isfinite(codes)].sort().values
between = (codes[1:] + codes[:-1]) / 2
probe = torch.cat([codes, between, between.nextafter(codes[1:]), between.nextafter(codes[:-1]), torch.tensor([500.0, -1e4, 1e-6])])
want = fp8_gptq.nearest(probe)
values = torch.zeros(1, 128)
got = torch.empty_like(probe)
for i in range(0, len(probe), 128):
    chunk = probe[i : i + 128]
    w = torch.zeros(1, 128)
    w[0, : len(chunk)] = chunk
    fp8_gptq._block_by_kernel(w, torch.eye(128), 0, 128)
    got[i : i + len(chunk)] = w[0, : len(chunk)]
assert torch.equal(got, want), (probe[got != want][:8], got[got != want][:8], want[got != want][:8])
# whole blocks against the column-by-column rounding: rows partly filling a program, a partial block
for rows, cols in ((40, 300), (7, 128)):
    x = torch.randn(4 * cols, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.1 + 1
    upper = fp8_gptq.upper_inverse(x.t() @ x)
    values = torch.randn(rows, cols, generator=g) * 60
    for start in range(0, cols, 128):
        end = min(start + 128, cols)
        a, b = values.clone(), values.clone()
        errors_a = fp8_gptq._block_by_kernel(a, upper, start, end)
        errors_b = fp8_gptq._block_in_steps(b, upper, start, end)
        torch.testing.assert_close(errors_a, errors_b, rtol=1e-4, atol=1e-4)
        same = (a == b).float().mean()
        assert same > 0.99, (rows, cols, start, float(same))
"""


def test_the_rounding_kernel_rounds_as_the_column_by_column_steps_do():
    """The CUDA kernel, run by Triton's interpreter on the CPU: its e4m3 rounding in fp32 arithmetic on every code,
    midpoint and neighbour of one, and its blocks against the plain steps (fp32 sums may flip a tie here and there)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


def test_calibration_rows_are_cut_from_the_training_tokens():
    stream = np.arange(10_000)
    ids = fp8_gptq.calibration_ids(stream, length=96, tokens=1000)
    assert ids.shape == (10, 96) and ids.dtype == torch.int64
    assert torch.equal(ids.flatten(), torch.arange(960))
    assert fp8_gptq.calibration_ids(stream[:50], length=96).shape == (1, 50)  # less than a row
    assert fp8_gptq.calibration_ids(stream, length=8192, tokens=5000).shape == (2, fp8_gptq.SEQUENCE)


def test_calibration_takes_the_training_rows_and_leaves_out_the_held_out_ones():
    dataset = rule_dataset(vocab=300, samples=200, max_seq_length=96, seed=0)
    config = TrainConfig(eval_split=0.5, seed=0)
    train_rows, held = split_rows(dataset, config.eval_split, config.seed)
    assert len(held) > 0

    def tokens(rows):
        samples = [s for r in rows for s in dataset.row_samples(int(r))]
        return np.concatenate(
            [dataset.input_ids[dataset.sample_offsets[s] : dataset.sample_offsets[s + 1]] for s in samples]
        )

    want = tokens(train_rows)
    ids = calibration_ids(dataset, config).flatten().numpy()
    assert len(want) < fp8_gptq.TOKENS and len(ids) == len(want) // 96 * 96
    np.testing.assert_array_equal(ids, want[: len(ids)])


SETTINGS = dict(mode="lora", precision="bf16", device="cpu", lora_r=8, lora_alpha=16, lora_dropout=0.0)


def tiny(path, fp8_on: bool, ids: torch.Tensor | None):
    """The tiny model prepared for LoRA, its weights in FP8 (rounded for `ids` if given) or bf16."""
    device = torch.device("cpu")
    base = loading.load_base_model(path, "lora", device, "bf16")
    return loading.prepare_for_training(base, TrainConfig(fp8=fp8_on, **SETTINGS).validate(), "lora", device, 0, ids)


@pytest.fixture(scope="module")
def prepared(tiny_llama):
    """The tiny model with FP8 weights rounded for the data, rounded to nearest, and in bf16; and inputs."""
    dataset = rule_dataset(vocab=300, samples=400, max_seq_length=96, seed=4)
    calibration = calibration_ids(dataset, TrainConfig(**SETTINGS))

    def model(fp8_on: bool, ids: torch.Tensor | None):
        return tiny(tiny_llama, fp8_on, ids)

    unseen = torch.from_numpy(np.asarray(dataset.input_ids[-960:], dtype=np.int64)).view(10, 96)
    return {"gptq": model(True, calibration), "nearest": model(True, None), "bf16": model(False, None)}, unseen


def test_every_adapted_layer_is_rounded_for_the_data_and_named_in_the_features(prepared):
    models, _ = prepared
    layers = [m for m in models["gptq"].model.modules() if fp8.of(m) is not None]
    assert len(layers) == 2 * 7 and all(m.weight.stride() == (0, 0) for m in layers)
    assert {"fp8[14]", "fp8_rounding[gptq]"} <= set(models["gptq"].features)
    assert "fp8_rounding[nearest]" in models["nearest"].features
    rounded = {n: fp8.of(m).data for n, m in models["gptq"].model.named_modules() if fp8.of(m) is not None}
    nearest = {n: fp8.of(m).data for n, m in models["nearest"].model.named_modules() if fp8.of(m) is not None}
    assert all(not torch.equal(rounded[n].float(), nearest[n].float()) for n in rounded)


def test_weights_rounded_for_the_data_follow_bf16_closer_on_other_rows_of_it(prepared):
    models, unseen = prepared

    def logits(name):
        tm = models[name]
        tm.model.eval()
        with torch.no_grad():
            return tm.model(input_ids=unseen).logits.float()

    want = logits("bf16")

    def error(name):
        return float((logits(name) - want).norm() / want.norm())

    # A 64-wide random model has little correlation to use (SmolLM2: 0.37% -> 0.17% of loss, benches/fp8_quality.py).
    assert error("gptq") < 0.92 * error("nearest"), (error("gptq"), error("nearest"))


def test_running_out_of_memory_midway_leaves_the_rest_rounded_to_nearest(tiny_llama, monkeypatch, caplog):
    """The calibration pass holds activations and an fp32 H: on a full card the run goes on, with fewer layers rounded for the data."""
    real, calls = fp8_gptq.upper_inverse, []

    def third_runs_out(hessian):
        calls.append(1)
        if len(calls) == 3:  # gate and up's input, after q, k, v and o of the first block
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return real(hessian)

    monkeypatch.setattr(fp8_gptq, "upper_inverse", third_runs_out)
    ids = calibration_ids(rule_dataset(vocab=300, samples=40, max_seq_length=96, seed=5), TrainConfig(**SETTINGS))
    tm = tiny(tiny_llama, True, ids)
    assert {"fp8[14]", "fp8_rounding[gptq 4 of 14]"} <= set(tm.features)
    assert sum(fp8.of(m) is not None for m in tm.model.modules()) == 14
    assert "after 4 of 14 layers" in caplog.text
