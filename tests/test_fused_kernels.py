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


def test_compiled_rope_backward_copies_no_gradient(monkeypatch):
    """Compiled, RoPE hands q's and k's gradients on in the projections' layout, with no copy in backward."""
    from torch.profiler import profile

    monkeypatch.setitem(fused._KERNELS, "rope_rows", torch.compile(fused.rope_rows))
    g = torch.Generator().manual_seed(0)
    cos, sin = torch.randn(1, 64, 16, generator=g), torch.randn(1, 64, 16, generator=g)

    def copies_in_backward() -> dict[str, int]:
        # q and k as the projections leave them: [tokens, heads x dim] seen as [batch, heads, tokens, dim]
        q_proj = torch.randn(64, 4 * 16, generator=g, requires_grad=True)
        k_proj = torch.randn(64, 2 * 16, generator=g, requires_grad=True)
        q, k = (p.view(1, 64, -1, 16).transpose(1, 2) for p in (q_proj, k_proj))
        outs = fused.rope(q, k, cos, sin)
        grads = [torch.empty_like(o).normal_(generator=g) for o in outs]  # attention allocates them like its inputs
        with profile() as prof:
            torch.autograd.backward(list(outs), grads)
        assert q_proj.grad is not None and k_proj.grad is not None
        return {
            e.key: e.count for e in prof.key_averages() if e.key in ("aten::clone", "aten::copy_", "aten::contiguous")
        }

    copies_in_backward()  # compiles
    assert copies_in_backward() == {}
