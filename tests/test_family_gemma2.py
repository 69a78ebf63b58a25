"""Gemma 2 training through the packed path: attention scores soft-capped before the softmax.

Gemma 2 caps every attention score (`cap * tanh(score / cap)`, 50 as published), which no
flash or SDPA kernel computes; packed attention writes the capped scores out under the
block-causal mask, on every device. Its sliding-window layers alternate with global ones
and its final logits are capped too. Its folders hold Google's Gemma 2 SentencePiece model,
as Gemma 3's hold theirs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_families import packed_and_alone_grads, packed_and_alone_losses, tiny_random_model
from test_family_gemma3 import GEMMA2_TEMPLATE, TEXT, assert_merged_adapter_top5_in_llama_cpp, gemma_folder

# gemma-2-2b-it's text config at Gemma 3's tiny sizes. The window (8) is shorter than every sample,
# and the cap (1.0, published: 50) is below the scores of the scaled-up random weights: both matter.
CONFIG = {
    **{k: v for k, v in TEXT.items() if k not in ("layer_types", "rope_parameters")},  # Gemma 3's sizes
    "model_type": "gemma2",
    "architectures": ["Gemma2ForCausalLM"],
    "attn_logit_softcapping": 1.0,
    "final_logit_softcapping": 2.0,
}


def gemma2(tmp_path):
    """The folder and its random model (eager attention, transformers' only one that caps)."""
    folder = gemma_folder(tmp_path, CONFIG)
    model = tiny_random_model(folder)
    with torch.no_grad():  # scores of a few units, so that capping them at 1 changes the attention
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    return folder, model


def test_packed_loss_equals_unpacked_with_capped_attention(tmp_path):
    folder, model = gemma2(tmp_path)
    packed, alone = packed_and_alone_losses(model, folder, tmp_path)
    np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)
    # The cap is in play: without it transformers gives other losses.
    model.config.attn_logit_softcapping = None
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    _, uncapped = packed_and_alone_losses(model, folder, tmp_path)
    assert np.abs(np.array(uncapped) - np.array(alone)).max() > 1e-3


def test_gemma2_template_masks_the_answers(tmp_path):
    """Gemma 2's published template (it refuses a system message, so the conversation has none)."""
    from test_data_templates import CONVERSATION, labelled_runs
    from test_families import prepared_like_transformers

    folder = gemma_folder(tmp_path, CONFIG, GEMMA2_TEMPLATE)
    tok, ds = prepared_like_transformers(folder, tmp_path, CONVERSATION[1:])
    assert labelled_runs(tok, ds.input_ids, ds.labels) == ["I am a bot.<end_of_turn>\n", "It is 4.<end_of_turn>\n"]


def test_rows_without_boundaries_keep_the_cap(tmp_path):
    """Evaluation or generation under packed attention, without sample boundaries, caps as transformers does."""
    from backpropagate.train.torch.attention import packed_attention

    _, model = gemma2(tmp_path)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with packed_attention(model):
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want)


def test_packed_gradients_equal_the_sum_of_unpacked_ones(tmp_path):
    folder, model = gemma2(tmp_path)
    packed, alone = packed_and_alone_grads(model, folder, tmp_path)
    for name, grad in alone.items():
        # The tied 256,000-row head sums every position's fp32 gradient: order differs by ~1e-5 there.
        torch.testing.assert_close(packed[name], grad, rtol=1e-4, atol=5e-5, msg=name)


def test_trainer_trains_a_gemma2_folder(tmp_path):
    """No longer refused: a LoRA through `Trainer`, its loss falling."""
    from test_families import trained_on_chat_rows

    folder, model = gemma2(tmp_path)
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["attn_logit_softcapping"] == 1.0
    result = trained_on_chat_rows(folder, tmp_path)
    assert result.steps == 4


def test_trained_adapter_exports_to_llama_cpp_gemma2_with_transformers_top5(tmp_path):
    """LoRA-train a tiny llama.cpp-shaped Gemma 2 through `Trainer`, export it merged to GGUF:
    llama.cpp's gemma2 (capped attention and logits, alternating windows) gives the next-token
    top-5 and log-probabilities transformers + peft give (eager attention, the one that caps)."""
    text = "alpha beta gamma #3? The answer is, in a few more words than the window holds"
    assert_merged_adapter_top5_in_llama_cpp("gemma2", tmp_path, text)


@pytest.mark.parametrize("size", ["2b", "9b"])
def test_presets_name_the_published_instruct_models(size):
    from backpropagate.presets import find_preset

    preset = find_preset(f"gemma-2-{size}")
    assert preset is not None and preset.model_id == f"google/gemma-2-{size}-it"
    assert find_preset(preset.model_id) == preset
