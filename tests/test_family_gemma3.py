"""Gemma 3 training through the packed path: what transformers does, sample by sample.

Gemma 3 caps its final logits (c * tanh(logits / c)), alternates sliding-window and
global attention layers, scales queries by `query_pre_attn_scalar` and its embeddings by
sqrt(hidden). The folders hold Google's own SentencePiece models (`packaged_tokenizers`),
the published tokenizer_config.json settings and chat templates from the shared template set.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from backpropagate.data import DataConfig, prepare
from backpropagate.errors import InputError
from backpropagate.train.torch.losses import token_logprobs
from conftest import TOKENIZERS
from packaged_tokenizers import packaged_file
from test_data_templates import CONVERSATION, labelled_runs
from test_families import (
    packed_and_alone_grads,
    packed_and_alone_losses,
    prepared_like_transformers,
    trained_on_chat_rows,
)

TEMPLATES = TOKENIZERS / "chat-templates"
GEMMA3_TEMPLATE = TEMPLATES / "from-tokenizer_config" / "gemma-3-1b-it.jinja"
GEMMA2_TEMPLATE = TEMPLATES / "llama.cpp" / "google-gemma-2-2b-it.jinja"
# Text tower as published for gemma-3-1b-it, at tiny sizes (heads of 16, the least flex attention takes
# on CUDA); the window (8) is shorter than every sample.
TEXT = {
    "vocab_size": 128256,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "sliding_window": 8,
    "layer_types": ["sliding_attention", "full_attention"] * 2,
    "max_position_embeddings": 512,
    "query_pre_attn_scalar": 16,
    "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    },
}


# tokenizer_config.json as google/gemma-2-2b-it and google/gemma-3-1b-it publish it (bar the template).
TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
    "clean_up_tokenization_spaces": False,
    "spaces_between_special_tokens": False,
    "tokenizer_class": "GemmaTokenizer",
}
# The SentencePiece model of each generation and its size (the published configs' vocab_size).
VOCAB = {"gemma2": 256000, "gemma3": 262144}


def gemma_folder(tmp_path: Path, config: dict, template: Path | None = None) -> Path:
    """The generation's real tokenizer.model and chat template (or `template`), and `config` as config.json."""
    generation = "gemma2" if config["model_type"] == "gemma2" else "gemma3"
    template = template or (GEMMA2_TEMPLATE if generation == "gemma2" else GEMMA3_TEMPLATE)
    folder = tmp_path / "gemma"
    folder.mkdir()
    shutil.copyfile(packaged_file(generation), folder / "tokenizer.model")
    config = json.loads(json.dumps(config))
    for part in (config, config.get("text_config", {})):
        if "vocab_size" in part:
            part["vocab_size"] = VOCAB[generation]
    (folder / "config.json").write_text(json.dumps(config))
    if not template.exists():
        pytest.skip(f"{template.name} not available")
    tok_config = {**TOKENIZER_CONFIG, "chat_template": template.read_text()}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return folder


def tiny_gemma(folder: Path):
    """A seeded float32 random model of the folder's config (the text model, or image + text)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)


MULTIMODAL = {
    "model_type": "gemma3",
    "architectures": ["Gemma3ForConditionalGeneration"],
    "text_config": {"model_type": "gemma3_text", **TEXT, "final_logit_softcapping": 30.0},
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 28,
        "patch_size": 14,
    },
    "mm_tokens_per_image": 4,
}


@pytest.mark.parametrize("softcap", [None, 0.5])
def test_text_tower_of_the_multimodal_config_packs_like_transformers(tmp_path, softcap):
    """`gemma3` (Gemma3ForConditionalGeneration): the packed path runs its text tower, and like
    transformers' image + text model applies no final soft-capping (published configs set none)."""
    config = json.loads(json.dumps(MULTIMODAL))
    config["text_config"]["final_logit_softcapping"] = softcap
    folder = gemma_folder(tmp_path, config)
    model = tiny_gemma(folder)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    packed, alone = packed_and_alone_losses(model, folder, tmp_path)
    np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)


def test_packed_gradients_equal_the_sum_of_unpacked_ones(tmp_path):
    """Full fine-tuning of a capped Gemma 3: a packed row's gradients are the samples' own, summed."""
    config = {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], **TEXT}
    folder = gemma_folder(tmp_path, {**config, "final_logit_softcapping": 2.0})
    model = tiny_gemma(folder)
    packed, alone = packed_and_alone_grads(model, folder, tmp_path)
    for name, grad in alone.items():
        torch.testing.assert_close(packed[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("head_trains", [False, True])
def test_soft_capped_token_logprobs_and_gradients(head_trains):
    """The chunked loss with a cap: log-softmax of c * tanh(logits / c), and its gradient, in both backward paths."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(29, 16, dtype=torch.float64, generator=g, requires_grad=True)
    weight = (4 * torch.randn(50, 16, dtype=torch.float64, generator=g)).requires_grad_(head_trains)
    targets = torch.randint(0, 50, (29,), generator=g)
    upstream = torch.randn(29, dtype=torch.float64, generator=g)
    wrt = [hidden, weight] if head_trains else [hidden]
    logits = 5.0 * torch.tanh(hidden @ weight.t() / 5.0)
    ref = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), wrt)
    out = token_logprobs(hidden, weight, targets, chunk=7, softcap=5.0)
    grads = torch.autograd.grad((out.double() * upstream).sum(), wrt)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    uncapped = token_logprobs(hidden, weight, targets, chunk=7)
    assert not torch.allclose(uncapped, out), "the cap must change these log-probabilities"


def test_gemma3_template_folds_the_system_message_and_masks_answers(tmp_path):
    """Gemma 3's published template: the system text opens the first user turn; the mask keeps each answer."""
    config = {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], **TEXT}
    tok, ds = prepared_like_transformers(gemma_folder(tmp_path, config, GEMMA3_TEMPLATE), tmp_path)
    assert "<start_of_turn>user\nBe brief.\n\nHi there" in tok.decode(ds.input_ids)
    assert labelled_runs(tok, ds.input_ids, ds.labels) == ["I am a bot.<end_of_turn>\n", "It is 4.<end_of_turn>\n"]


@pytest.mark.parametrize(
    ("template", "messages", "reason"),
    [
        (GEMMA2_TEMPLATE, CONVERSATION, "System role not supported"),
        (GEMMA3_TEMPLATE, CONVERSATION[1:2] * 2, "Conversation roles must alternate"),
    ],
)
def test_a_row_the_gemma_template_refuses_is_a_coded_error(tmp_path, template, messages, reason):
    """Gemma 2 raises on a system message, Gemma 3 on roles out of order: the row is named, no traceback."""
    config = {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], **TEXT}
    folder = gemma_folder(tmp_path, config, template)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": messages}) + "\n")
    with pytest.raises(InputError) as err:
        prepare(data, folder, DataConfig(cache=False))
    assert err.value.code == "INPUT_TEMPLATE_RENDER_FAILED"
    assert f"{data}:1: {reason}" in err.value.message


def test_trained_adapter_exports_to_llama_cpp_gemma3_with_transformers_top5(tmp_path):
    """LoRA-train a tiny llama.cpp-shaped Gemma 3 through `Trainer`, export it merged to GGUF:
    llama.cpp's gemma3 gives the next-token top-5 and log-probabilities transformers + peft give."""
    assert_merged_adapter_top5_in_llama_cpp("gemma3", tmp_path, "alpha beta gamma #3? The answer is")


def assert_merged_adapter_top5_in_llama_cpp(family: str, tmp_path: Path, text: str) -> None:
    """A LoRA trained by `Trainer` on a tiny `family` model, merged into an f32 GGUF: llama.cpp
    tokenizes `text` and predicts its next-token top-5 and log-probabilities as transformers + peft."""
    pytest.importorskip("xllamacpp")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backpropagate.export import export
    from backpropagate.generate import GGUFModel
    from export_models import build_model

    base = build_model(family, tmp_path / "base")
    result = trained_on_chat_rows(base, tmp_path)
    gguf = export(result.adapter_dir, "gguf", quantization="f32").path

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), result.adapter_dir
    )
    ids = AutoTokenizer.from_pretrained(base)(text)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
    want = torch.topk(logp, 5)
    llm = GGUFModel(gguf, n_ctx=256)
    assert llm.tokenize(text) == ids
    got = llm.top_logprobs(text, 5)
    assert [t for t, _ in got] == want.indices.tolist()
    np.testing.assert_allclose([v for _, v in got], want.values.numpy(), atol=1e-2)


@pytest.mark.parametrize("size", ["1b", "4b", "12b"])
def test_presets_name_the_published_instruct_models(size):
    """`gemma-3-4b` and `google/gemma-3-4b-it` are the same preset; 12B gets the 7B+ context and rate."""
    from backpropagate.presets import find_preset

    preset = find_preset(f"gemma-3-{size}")
    assert preset is not None and preset.model_id == f"google/gemma-3-{size}-it"
    assert find_preset(preset.model_id.upper()) == preset
    assert (preset.max_seq_length, preset.learning_rate) == ((2048, 1e-4) if size == "12b" else (4096, 2e-4))


def test_image_text_model_exports_its_text_tower_to_llama_cpp(tmp_path):
    """gemma-3-4b/12b are `Gemma3ForConditionalGeneration`: the GGUF holds the text tower
    (`model.language_model.*`, image tower left out) and predicts what transformers does."""
    pytest.importorskip("xllamacpp")
    from transformers import AutoConfig, AutoModelForCausalLM, Gemma3Config

    from backpropagate import _core
    from export_models import build_model
    from test_export_gguf import assert_top5_like_transformers

    text_dir = build_model("gemma3", tmp_path / "text")
    text = AutoConfig.from_pretrained(text_dir).to_dict()
    config = Gemma3Config(text_config=text, vision_config=MULTIMODAL["vision_config"], mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.model.language_model.load_state_dict(AutoModelForCausalLM.from_pretrained(text_dir).model.state_dict())
    folder = tmp_path / "image-text"
    model.save_pretrained(folder)
    for f in text_dir.glob("tokenizer*"):
        shutil.copy(f, folder / f.name)
    gguf = tmp_path / "gemma3.gguf"
    _core.convert_to_gguf(str(folder), str(gguf), "f32")
    assert_top5_like_transformers(gguf, folder)
