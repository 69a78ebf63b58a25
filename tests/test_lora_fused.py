"""The fused LoRA path computes what peft computes (outputs and adapter gradients)."""

import pytest
import torch

from backpropagate.train.torch import lora_fused


def _peft_model(path, quantized=False, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        kwargs["device_map"] = {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", **lora))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the adapter matter
            torch.nn.init.normal_(p, std=0.05)
    return peft_model


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [{"r": 4, "lora_alpha": 8}, {"r": 8, "lora_alpha": 4, "use_rslora": True}])
def test_fused_lora_matches_peft(tiny_qwen2, lora):
    model = _peft_model(tiny_qwen2, **lora)
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    assert lora_fused.install(model) == 14
    loss, grads = _loss_and_grads(model, ids)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)


def test_siblings_share_one_op_and_their_input(tiny_qwen2, monkeypatch):
    """q, k and v (and gate and up) run as one op on the same input; another input runs alone."""
    model = _peft_model(tiny_qwen2, r=4, lora_alpha=8)
    layer = model.base_model.model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    x = torch.randn(2, 5, 64)
    want = [m(x).detach() for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    lora_fused.install(model)
    assert attn.q_proj.bp_shared_input is attn.v_proj.bp_shared_input is not mlp.up_proj.bp_shared_input
    calls = []
    real = lora_fused.lora_projections

    def counted(x, layers, owner):
        calls.append(len(layers))
        return real(x, layers, owner)

    monkeypatch.setattr(lora_fused, "lora_projections", counted)
    got = [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    assert calls == [3]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    attn.q_proj(x)
    other = x + 1  # not the tensor q was given: k computes alone
    torch.testing.assert_close(attn.k_proj(other), attn.k_proj._peft_forward(other), rtol=1e-5, atol=1e-6)
    assert calls == [3, 3, 1]
    attn.q_proj(x)
    x.mul_(2)  # changed in place after the op ran: k's held output is stale
    torch.testing.assert_close(attn.k_proj(x), attn.k_proj._peft_forward(x), rtol=1e-5, atol=1e-6)
    assert calls == [3, 3, 1, 3, 1]
    with torch.inference_mode():  # tensors without a version counter
        y = x.clone()
        got = [m(y) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    assert calls == [3, 3, 1, 3, 1, 3]
    torch.testing.assert_close(got[2], attn.v_proj._peft_forward(x), rtol=1e-5, atol=1e-6)


def test_dora_and_dropout_keep_peft_forward(tiny_llama):
    model = _peft_model(tiny_llama, r=4, lora_alpha=8, use_dora=True)
    ids = torch.randint(0, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    ref_loss, _ = _loss_and_grads(model, ids)
    lora_fused.install(model)
    loss, grads = _loss_and_grads(model, ids)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert any("magnitude" in n for n in grads)


def test_fused_lora_on_4bit_base_matches_dequantized_reference(tiny_llama):
    """QLoRA on the CPU backend of bitsandbytes: the fused op dequantizes nf4 weights exactly."""
    import bitsandbytes.functional as bnbf

    model = _peft_model(tiny_llama, quantized=True, r=4, lora_alpha=8)
    lora_fused.install(model)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    base = layer.get_base_layer()
    assert type(base).__name__ == "Linear4bit"
    x = torch.randn(5, 64, requires_grad=True)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    out = layer(x)
    w = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
    x_ref = x.detach().clone().requires_grad_(True)
    a_ref, b_ref = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    ref = x_ref @ w.t() + 2.0 * (x_ref @ a_ref.t()) @ b_ref.t()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, a, b], upstream)
    want = torch.autograd.grad(ref, [x_ref, a_ref, b_ref], upstream)
    for g, w_ in zip(got, want, strict=True):
        torch.testing.assert_close(g, w_, rtol=1e-4, atol=1e-5)


def test_adapter_copies_follow_optimizer_steps(tiny_qwen2):
    """Cached compute-dtype copies of A and s*B are remade after each step, so training matches peft's."""
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    finals = []
    for fused in (False, True):
        model = _peft_model(tiny_qwen2, r=4, lora_alpha=8)
        if fused:
            lora_fused.install(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True)  # leaves version counters alone
        for _ in range(3):
            model.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            lora_fused.adapters_updated()
        finals.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, want in finals[0].items():
        torch.testing.assert_close(finals[1][name], want, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(3584, 18944), (512, 3584), (40, 72), (7, 64)])
def test_nf4_kernel_equals_bitsandbytes_bit_for_bit(shape):
    import bitsandbytes.functional as bnbf

    from backpropagate.train.torch import nf4

    torch.manual_seed(0)
    weight = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    absmax = lora_fused._block_scales(packed, state)
    assert nf4.supported(packed, state)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ours = nf4.dequantize(packed, absmax, state, dtype)
        theirs = torch.ops.bitsandbytes.dequantize_4bit.default(
            packed, absmax, state.blocksize, state.quant_type, state.shape, dtype
        )
        assert ours.shape == theirs.shape == shape
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("rank", [4, 5])
def test_wide_layout_matches_peft_across_updates(tiny_qwen2, rank):
    """Gate+up (and q+k+v here) as one matmul over [x | x A^T] compute peft's loss and gradients, also after A and B change."""
    from backpropagate.train.torch import lora_concat

    model = _peft_model(tiny_qwen2, r=rank, lora_alpha=8)
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    lora_fused.install(model)
    layers = model.base_model.model.model.layers
    # Per layer: gate+up, and q+k+v (3 x 64 outputs of 64 inputs here); o and down are not wide.
    assert lora_concat.install(model) == 2 * len(layers)
    mlp = layers[0].mlp
    assert not {"bp_wide"} & (set(layers[0].self_attn.o_proj.__dict__) | set(mlp.down_proj.__dict__))
    wide = mlp.gate_proj.bp_shared_input.copies["bp_wide"]
    gate = mlp.gate_proj.get_base_layer().weight
    assert gate.untyped_storage().data_ptr() == wide.buffers[0].untyped_storage().data_ptr()  # moved, not copied
    assert wide.buffers[0].shape[1] % lora_concat.ALIGN == 0
    loss, grads = _loss_and_grads(model, ids)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # what an optimizer step does to the masters
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.02)
    lora_fused.adapters_updated()
    loss, grads = _loss_and_grads(model, ids)
    for layer in layers:  # peft's own forward, on the moved weights
        for m in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.self_attn.q_proj, layer.self_attn.k_proj):
            m.forward = m._peft_forward
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)
