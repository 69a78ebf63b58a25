"""CUDA paths of the training engine (run on a GPU machine: pytest -m gpu tests/test_train_gpu.py)."""

import types

import numpy as np
import pytest
import torch

from train_helpers import rule_dataset

pytestmark = pytest.mark.gpu  # skipped without CUDA (conftest)
CUDA = torch.device("cuda")


def test_varlen_attention_equals_samples_alone_on_cuda():
    from backpropagate.train.torch import attention

    torch.manual_seed(0)
    lengths = [37, 200, 5, 64]
    total, heads, kv_heads, dim = sum(lengths), 8, 2, 64
    q = torch.randn(1, heads, total, dim, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, kv_heads, total, dim, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, kv_heads, total, dim, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=CUDA)
    module = torch.nn.Module()
    out, _ = attention.packed_attention_forward(
        module, q, k, v, None, scaling=dim**-0.5, **attention.packed_kwargs(cu, max(lengths))
    )
    assert attention.varlen_supported(dim**-0.5, dim, None)
    grads = torch.autograd.grad(out.float().square().sum(), [q, k, v])
    pieces = []
    for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        pieces.append(
            torch.nn.functional.scaled_dot_product_attention(
                q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], is_causal=True, enable_gqa=True
            ).transpose(1, 2)
        )
    ref = torch.cat(pieces, dim=1)
    ref_grads = torch.autograd.grad(ref.float().square().sum(), [q, k, v])
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)


needs_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="cuDNN attention needs 9.0"
)


@needs_hopper
def test_cudnn_attention_is_verified_and_serves_rows_of_equal_samples(monkeypatch):
    from transformers import Qwen2Config

    from backpropagate.train.torch import attention, cudnn_attention

    heads, kv_heads, dim = 4, 1, 128  # a layout no other test verifies, so theirs keep flash attention
    config = Qwen2Config(num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=512)
    model = types.SimpleNamespace(config=config)
    assert cudnn_attention.check(model, CUDA, torch.bfloat16)
    assert not cudnn_attention.check(model, CUDA, torch.float32)
    torch.manual_seed(0)
    total = 1000
    q, k, v = (  # laid out as a model's projections leave them: [1, T, heads, dim] seen as [1, heads, T, dim]
        torch.randn(1, total, n, dim, device=CUDA, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        for n in (heads, kv_heads, kv_heads)
    )
    assert cudnn_attention.verified(q, k)
    for bounds in ([0, total], [0, 500, total], [0, 300, total]):  # equal samples: cuDNN; unequal: flash
        rows = attention.count_equal_rows(np.array(bounds), total)
        longest = int(np.diff(bounds).max())
        cu = torch.tensor(bounds, dtype=torch.int32, device=CUDA)
        kwargs = attention.packed_kwargs(cu, longest, equal_rows=rows)
        out, _ = attention.packed_attention_forward(torch.nn.Module(), q, k, v, None, scaling=dim**-0.5, **kwargs)
        ref = attention._varlen(q, k, v, None, (cu, cu, longest, longest), dim**-0.5, None)
        if not rows:
            assert torch.equal(out, ref)
            continue
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
        grads = torch.autograd.grad(out.float().square().sum(), [q, k, v])
        ref_grads = torch.autograd.grad(ref.float().square().sum(), [q, k, v])
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)

    def fails(*args):
        raise RuntimeError("cuDNN Frontend error: no engine for this length (simulated)")

    monkeypatch.setattr(cudnn_attention, "attend", fails)
    cu = torch.tensor([0, total], dtype=torch.int32, device=CUDA)
    out, _ = attention.packed_attention_forward(
        torch.nn.Module(), q, k, v, None, scaling=dim**-0.5, **attention.packed_kwargs(cu, total, equal_rows=1)
    )
    assert torch.equal(out, attention._varlen(q, k, v, None, (cu, cu, total, total), dim**-0.5, None))
    assert not cudnn_attention.verified(q, k)  # flash attention for the rest of the process


def test_flex_attention_fallback_equals_block_causal_sdpa_on_cuda():
    from backpropagate.train.torch import attention

    torch.manual_seed(0)
    q = torch.randn(1, 8, 300, 64, device=CUDA, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 340, 64, device=CUDA, dtype=torch.bfloat16)
    v = torch.randn(1, 2, 340, 64, device=CUDA, dtype=torch.bfloat16)
    cu = torch.tensor([0, 100, 137, 300], dtype=torch.int32, device=CUDA)
    # Query segments shorter than their keys (a shared prefix gathered): diagonal at the bottom right.
    cu_k = torch.tensor([0, 100, 177, 340], dtype=torch.int32, device=CUDA)
    for keys, n in ((cu, 300), (cu_k, 340)):
        for window in (None, 16):
            out = attention._flex(q, k[:, :, :n], v[:, :, :n], cu, keys, 0.125, window)
            ref = attention._sdpa_block_causal(q, k[:, :, :n], v[:, :, :n], cu, keys, 0.125, window)
            torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_packed_losses_equal_samples_alone_on_cuda(tiny_qwen2):
    from transformers import AutoModelForCausalLM

    from backpropagate.train.torch.attention import packed_attention
    from backpropagate.train.torch.loading import TrainingModel
    from backpropagate.train.torch.loop import forward_hidden
    from backpropagate.train.torch.losses import DeviceBatch, target_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.bfloat16).to(CUDA)
    tm = TrainingModel(model, CUDA, "lora", torch.bfloat16, False, 0)
    dataset = rule_dataset(vocab=400, samples=12, min_len=5, max_len=30, max_seq_length=96, seed=3)
    samples = dataset.row_samples(0)
    batch = DeviceBatch.from_batch(dataset.batch_of(samples), CUDA)
    with torch.no_grad(), packed_attention(model):
        logp = target_logprobs(forward_hidden(tm, batch), tm.lm_head, batch)
        for i, s in enumerate(samples):
            alone = DeviceBatch.from_batch(dataset.batch_of(np.array([s])), CUDA)
            single = target_logprobs(forward_hidden(tm, alone), tm.lm_head, alone)
            torch.testing.assert_close(logp[batch.target_sample == i], single, rtol=2e-2, atol=2e-2)


def test_fused_cross_entropy_on_cuda_matches_full_logits():
    from backpropagate.train.torch import fused, losses

    assert fused.install(torch.nn.Linear(1, 1)) == ["cross_entropy"]  # no decoder family: only the loss
    torch.manual_seed(0)
    hidden = torch.randn(3000, 512, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(32000, 512, device=CUDA, dtype=torch.bfloat16) * 0.05
    targets = torch.randint(0, 32000, (3000,), device=CUDA)
    out = losses.token_logprobs(hidden, weight, targets, chunk=1024)
    (grad,) = torch.autograd.grad(out.sum(), [hidden])
    ref = torch.log_softmax((hidden.float() @ weight.float().t()), -1).gather(1, targets[:, None]).squeeze(1)
    (ref_grad,) = torch.autograd.grad(ref.sum(), [hidden])
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=5e-2)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=5e-2, atol=5e-2)


def test_compiled_kernels_match_eager_modules(tiny_llama):
    from transformers import AutoModelForCausalLM

    from backpropagate.train.torch import fused

    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).to(CUDA)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).to(CUDA)
    assert {"rms_norm", "swiglu", "rope"} <= set(fused.install(model))
    ids = torch.randint(0, 500, (1, 300), device=CUDA)
    a = ref(input_ids=ids, labels=ids)
    b = model(input_ids=ids, labels=ids)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-2, atol=1e-2)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad.float(), q.grad.float(), rtol=1e-1, atol=1e-2, msg=name)


@pytest.mark.parametrize("mode", ["qlora", "lora"])
def test_training_on_cuda_loss_falls(mode, tiny_llama, tmp_path):
    from backpropagate import Trainer

    dataset = rule_dataset(vocab=300, samples=90, max_seq_length=96, seed=0)
    result = Trainer(
        "tiny-llama", mode=mode, output_dir=str(tmp_path / mode), progress=False, report_to="none", learning_rate=1e-2
    ).train(dataset, steps=12)
    assert result.losses[-1][1] < result.losses[0][1] - 0.3
    assert any(f.startswith("fused_lora") for f in result.features)
    assert "rms_norm" in result.features and "cross_entropy" in result.features


needs_fp8 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs FP8 tensor cores"
)


@needs_fp8
def test_fp8_on_cuda_follows_the_bf16_curve(tiny_llama, tmp_path):
    from backpropagate import Trainer

    dataset = rule_dataset(vocab=300, samples=90, max_seq_length=96, seed=0)
    curves = {}
    for fp8 in (False, True):
        result = Trainer(
            "tiny-llama",
            mode="lora",
            fp8=fp8,
            output_dir=str(tmp_path / str(fp8)),
            progress=False,
            report_to="none",
            learning_rate=1e-2,
        ).train(dataset, steps=12)
        curves[fp8] = np.array([loss for _, loss in result.losses])
    assert {"fp8[14]", "fp8_rounding[gptq]"} <= set(result.features)
    assert curves[True][-3:].mean() < curves[True][:3].mean() - 0.2, curves
    assert np.abs(curves[True] - curves[False]).max() < 0.05 * curves[False].max(), curves


def test_fp8_weights_are_rounded_for_their_inputs_by_the_kernel_as_column_by_column():
    """The rounding kernel on the card: e4m3's nearest value of every code and midpoint, and 7B-wide blocks."""
    from backpropagate.train.torch import fp8_gptq

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    codes = codes[torch.isfinite(codes)].sort().values
    probe = torch.cat([codes, (codes[1:] + codes[:-1]) / 2, torch.tensor([500.0, -1e4, 1e-6])]).cuda()
    w = torch.nn.functional.pad(probe, (0, -len(probe) % 128)).view(-1, 128).t().contiguous()
    fp8_gptq._block_by_kernel(w, torch.eye(w.shape[1], device="cuda").contiguous(), 0, w.shape[1])
    assert torch.equal(w.t().flatten()[: len(probe)], fp8_gptq.nearest(probe))
    g = torch.Generator(device="cuda").manual_seed(0)
    for rows, cols in ((3584, 18944), (1000, 3584)):
        x = torch.randn(8192, cols, device="cuda", generator=g) + torch.randn(cols, device="cuda", generator=g)
        upper = fp8_gptq.upper_inverse(x.t() @ x)
        values = torch.randn(rows, cols, device="cuda", generator=g) * 60
        a, b = values.clone(), values.clone()
        torch.testing.assert_close(
            fp8_gptq._block_by_kernel(a, upper, 128, 256), fp8_gptq._block_in_steps(b, upper, 128, 256)
        )
        assert (a == b).float().mean() > 0.99
        rounded = fp8_gptq.rounded(values, upper)
        assert torch.equal(fp8_gptq.nearest(rounded), rounded)


@needs_fp8
def test_fp8_rows_and_blocks_are_quantized_by_the_kernels_and_compiled_once_for_every_width():
    """The row and block kernels and their compiled fallbacks match the plain operations.

    Every width shares one compiled graph: none falls back to eager.
    """
    import torch._dynamo

    from backpropagate.train.torch import fp8, fp8_rows

    def check(rows: int, width: int) -> None:
        x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        plain = x.detach().contiguous()
        by_rows = [fp8._compiled("fp8_rows", plain)]
        if fp8_rows.fits(width):
            by_rows += [fp8_rows.quantized_by_kernel(plain), fp8.quantize_rows(x)]
        by_blocks = [fp8._compiled("fp8_blocks", plain), fp8.quantize_blocks(x)]
        for expected, ways in ((fp8.rows_in_fp8(plain), by_rows), (fp8.blocks_in_fp8(plain), by_blocks)):
            for padded_q, padded_scale in ways:
                # Block scales come token-contiguous, as cuBLAS reads them, over rows padded to 4.
                q, scale = padded_q[:rows], padded_scale[:rows]
                assert q.shape == expected[0].shape and scale.stride(0) == 1
                torch.testing.assert_close(scale, expected[1])
                # Another division may round a tie the other way: one e4m3 step (1/8, or the least subnormal) apart.
                torch.testing.assert_close(q.float(), expected[0].float(), rtol=0.125, atol=2**-9)

    check(96, 64)
    check(80, 48)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows, width in ((8192, 3584), (8192, 512), (1008, 18944), (16, 4608), (61, 576), (4, 40000)):
            check(rows, width)


@needs_fp8
def test_fp8_products_take_block_scales_on_cards_whose_cublas_has_them():
    """CUDA 12.9+ multiplies 1 x 128 blocks; each product equals the exact one of its e4m3 values at awkward sizes.

    64 tokens and 61 (cuBLAS takes multiples of 4 only: padded, and the padding dropped),
    contracted dimensions of 576 and 192 (partial last blocks, where the card takes them).
    """
    from backpropagate.train.torch import fp8

    version = tuple(int(p) for p in (torch.version.cuda or "0.0").split(".")[:2])
    layout = fp8.layout_on(torch.device("cuda"))
    assert layout.blocks is not None or version < (12, 9), layout
    g = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(192, 576, device="cuda", generator=g) * 0.02
    quantized = fp8.Fp8Weight.of(weight)
    dequantized = quantized.data.float() * quantized.scale
    for tokens in (64, 61):
        x = torch.randn(tokens, 576, device="cuda", generator=g).to(torch.bfloat16)
        dy = torch.randn(tokens, 192, device="cuda", generator=g).to(torch.bfloat16)
        for product, operand, matrix in (
            (quantized.forward(x, torch.bfloat16), x, dequantized.t()),
            (quantized.input_grad(dy, torch.bfloat16), dy, dequantized),
        ):
            values, scales = fp8.quantize(operand)
            assert (scales.shape[1] > 1) == layout.blocks_for(operand.shape[1])
            want = (fp8.dequantized(values, scales) @ matrix)[:tokens]
            assert product.shape == want.shape
            torch.testing.assert_close(product.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
    for k in (384, 3584, 18944):  # 3 blocks, then a 7B's widths
        assert layout.blocks is None or layout.blocks_for(k)


def test_fp8_weights_are_transposed_by_the_kernel_and_by_torch_if_it_fails(monkeypatch, caplog):
    """Every projection shape of a 7B layer moves byte for byte; a kernel that fails once hands over for good."""
    from backpropagate.train.torch import byte_transpose

    for shape in ((18944, 3584), (3584, 18944), (3584, 3584), (512, 3584), (48, 80)):
        x = torch.randint(0, 256, shape, dtype=torch.uint8, device=CUDA).view(torch.float8_e4m3fn)
        assert torch.equal(byte_transpose.transposed(x).view(torch.uint8), x.view(torch.uint8).t())
    tried = []

    def broken(x: torch.Tensor) -> torch.Tensor:
        tried.append(x.shape)
        raise RuntimeError("no kernel")

    monkeypatch.setattr(byte_transpose.transposed, "fast", broken)
    with caplog.at_level("WARNING", logger="backpropagate"):
        for _ in range(2):
            assert torch.equal(byte_transpose.transposed(x).view(torch.uint8), x.view(torch.uint8).t())
    assert len(tried) == 1 and "transpose kernel failed" in caplog.text


def test_offloaded_activations_train_the_same_curve_and_time_steps_on_the_gpu(tiny_llama, tmp_path):
    """Layer inputs in pinned host memory (side-stream copies) give the curve of keeping them on the card.

    Each step's time is read off the GPU's timeline, so even a step whose launch waited for
    the GPU (a recompute plan that changed and recaptured the graph) gets its real time.
    """
    import json

    from backpropagate import Trainer

    dataset = rule_dataset(vocab=300, samples=90, max_seq_length=96, seed=0)
    curves, rates = {}, {}
    for offload in ("off", "on"):
        out = tmp_path / offload
        options = dict(gradient_checkpointing="on", offload_activations=offload, progress=False, report_to="none")
        result = Trainer("tiny-llama", mode="lora", output_dir=str(out), learning_rate=1e-2, **options).train(
            dataset, steps=6
        )
        curves[offload] = np.array([loss for _, loss in result.losses])
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rates[offload] = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
    assert any("+offload[" in f for f in result.features), result.features
    np.testing.assert_allclose(curves["on"], curves["off"], rtol=1e-2)
    # A 2-layer model's step is milliseconds: a rate in the millions would mean a step timed as ~0.
    assert all(0 < r < 5e6 for r in rates["on"] + rates["off"]), rates


def test_replayed_inputs_train_the_same_curve_on_the_gpu(tiny_llama, tmp_path, monkeypatch):
    """One offloaded input in two goes to pinned host memory, backward replays the other: the curve of keeping them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from backpropagate import Trainer
    from backpropagate.train.torch.recompute import RecomputePlan

    config = AutoConfig.from_pretrained(tiny_llama)
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    start_offload = RecomputePlan.start_offload
    monkeypatch.setattr(
        RecomputePlan, "start_offload", lambda plan, on_card=1, every=1, room=None: start_offload(plan, 1, 2)
    )
    dataset = rule_dataset(vocab=300, samples=90, max_seq_length=96, seed=0)
    curves, features = {}, {}
    for offload in ("off", "on"):
        options = dict(gradient_checkpointing="on", offload_activations=offload, progress=False, report_to="none")
        result = Trainer(
            str(tmp_path / "model"), mode="lora", output_dir=str(tmp_path / offload), learning_rate=1e-2, **options
        ).train(dataset, steps=6)
        curves[offload], features[offload] = np.array([loss for _, loss in result.losses]), result.features
    assert "recompute[4/4]+offload[2/4]+replay[1/4]" in features["on"], features
    np.testing.assert_allclose(curves["on"], curves["off"], rtol=1e-2)


def test_kept_layers_past_a_slice_s_length_run_as_cuda_graphs(tiny_llama, tmp_path, monkeypatch):
    """Past `CHUNK_TOKENS` the first step recomputes and slices; once the plan keeps every layer, graphs take over."""
    from backpropagate import Trainer
    from backpropagate.train.torch import chunked_mlp

    dataset = rule_dataset(vocab=300, samples=90, max_seq_length=96, seed=0)
    curves, features = {}, {}
    for chunk in (8192, 64):
        monkeypatch.setattr(chunked_mlp, "CHUNK_TOKENS", chunk)
        options = dict(gradient_checkpointing="auto", progress=False, report_to="none")
        result = Trainer(
            "tiny-llama", mode="lora", output_dir=str(tmp_path / str(chunk)), learning_rate=1e-2, **options
        )
        result = result.train(dataset, steps=6)
        curves[chunk], features[chunk] = np.array([loss for _, loss in result.losses]), result.features
    assert "recompute[0/2]" in features[64] and any(f.startswith("cuda_graphs[") for f in features[64]), features
    np.testing.assert_allclose(curves[64], curves[8192], rtol=1e-2)
