"""Fused kernels: the same mathematics as transformers' modules; patched only where it matches."""

import torch

from backpropagate.train.torch import fused


def test_patched_model_computes_what_the_original_computes(tiny_qwen2, tiny_llama):
    from transformers import AutoModelForCausalLM

    for path in (tiny_qwen2, tiny_llama):
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        modeling = __import__(type(model).__module__, fromlist=["apply_rotary_pos_emb"])
        original_rope = modeling.apply_rotary_pos_emb
        try:
            patched = fused.install(model)
            assert patched == ["cross_entropy", "rms_norm", "rope", "swiglu"]
            ids = torch.randint(0, 500, (1, 40), generator=torch.Generator().manual_seed(0))
            a, b = ref(input_ids=ids, labels=ids), model(input_ids=ids, labels=ids)
            a.loss.backward()
            b.loss.backward()
            torch.testing.assert_close(b.loss, a.loss)
            for p, q in zip(model.parameters(), ref.parameters(), strict=True):
                torch.testing.assert_close(p.grad, q.grad)
        finally:
            modeling.apply_rotary_pos_emb = original_rope


def test_unknown_families_keep_their_modules():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert fused.install(model) == ["cross_entropy"]
    assert all("forward" not in vars(m) for m in model.modules())


def test_functions_match_transformers_formulas():
    from transformers.models.llama import modeling_llama as ml

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 32, generator=g)
    norm = ml.LlamaRMSNorm(32, eps=1e-5)
    torch.nn.init.normal_(norm.weight, generator=g)
    torch.testing.assert_close(fused.rms_norm(x, norm.weight, 1e-5), norm(x))
    q, k = torch.randn(2, 4, 7, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g)
    cos, sin = torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    for got, want in zip(fused.rope(q, k, cos, sin), ml.apply_rotary_pos_emb(q, k, cos, sin), strict=True):
        torch.testing.assert_close(got, want)
