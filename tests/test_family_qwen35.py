"""Qwen3.5 training through the packed path: Gated DeltaNet layers restart at every sample.

Three of every four layers are linear attention (a recurrent state and a short causal
convolution), the fourth gated full attention. A packed row must give each sample what it
gets alone, so no state may cross a sample boundary. The folders carry Qwen3.5's own
vocabulary (`packaged_tokenizers.ranked_tokenizer_json`: built from its published ranks and
checked against llama.cpp's record of the published tokenizer) and the published Qwen3.5
chat template from the shared template set.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from backpropagate._core import DataTokenizer
from backpropagate.data import DataConfig, prepare
from backpropagate.errors import InputError
from conftest import TOKENIZERS
from packaged_tokenizers import LLAMA_CPP_CHECK_TEXT, QWEN35_CHECK_HASH, ranked_tokenizer_json
from test_data_templates import CONVERSATION, labelled_runs
from test_families import (
    TEXTS,
    packed_and_alone_grads,
    packed_and_alone_losses,
    tiny_random_model,
    trained_on_chat_rows,
)

TEMPLATE = TOKENIZERS / "chat-templates" / "llama.cpp" / "Qwen3.5-4B.jinja"
# The text tower as published (model_type qwen3_5_text), at tiny sizes: layers 0-2 linear, 3 full.
# The rope sections ([11, 11, 10] for the published 256-wide heads) cover the 2 rotated pairs.
TEXT = {
    "model_type": "qwen3_5_text",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "max_position_embeddings": 512,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [1, 1, 0],
        "mrope_interleaved": True,
    },
}
# The published embedding rows (248,044 tokens and 33 added ones, padded).
VOCAB = 248320
# The tokenizer settings of the published folders (the class follows model_type: Qwen3_5Tokenizer).
TOKENIZER_CONFIG = {
    "add_bos_token": False,
    "add_prefix_space": False,
    "bos_token": None,
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "unk_token": None,
    "errors": "replace",
    "model_max_length": 262144,
    "split_special_tokens": False,
    "clean_up_tokenization_spaces": False,
}
# The published form: an image + text model whose text tower is trained.
VISION = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32}


def qwen35_folder(tmp_path: Path, multimodal: bool) -> Path:
    """Qwen3.5's tokenizer and published chat template with a tiny Qwen3.5 config.json."""
    if not TEMPLATE.exists():
        pytest.skip("Qwen3.5 chat template not available")
    folder = tmp_path / "qwen3.5"
    folder.mkdir()
    shutil.copyfile(ranked_tokenizer_json("qwen3.5"), folder / "tokenizer.json")
    text = {**TEXT, "vocab_size": VOCAB}
    config = (
        {"model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"], "text_config": text}
        | {"vision_config": VISION, "tie_word_embeddings": True}
        if multimodal
        else {**text, "architectures": ["Qwen3_5ForCausalLM"], "tie_word_embeddings": True}
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**TOKENIZER_CONFIG, "chat_template": TEMPLATE.read_text()})
    )
    return folder


@pytest.mark.parametrize("multimodal", [False, True], ids=["text", "image+text"])
def test_packed_loss_equals_unpacked(tmp_path, multimodal):
    folder = qwen35_folder(tmp_path, multimodal)
    model = tiny_random_model(folder)
    assert sum(type(m).__name__ == "Qwen3_5GatedDeltaNet" for m in model.modules()) == 3
    packed, alone = packed_and_alone_losses(model, folder, tmp_path)
    np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)


def test_packed_gradients_equal_the_sum_of_unpacked_ones(tmp_path):
    """Full fine-tuning: a packed row's gradients (recurrent and conv weights included) are the samples' own, summed."""
    folder = qwen35_folder(tmp_path, multimodal=False)
    model = tiny_random_model(folder)
    packed, alone = packed_and_alone_grads(model, folder, tmp_path)
    assert any(".linear_attn.conv1d." in name for name in packed)
    for name, grad in alone.items():
        torch.testing.assert_close(packed[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_shared_prompt_gives_the_loss_and_gradients_of_two_sequences(tmp_path):
    """ORPO's shared prompt (stored once, keys gathered by `kv_index`): the recurrent layers see
    each answer after its whole prompt, so loss and LoRA gradients equal the pair stored twice."""
    from backpropagate.config import TrainConfig
    from backpropagate.examples import example_path
    from backpropagate.train.torch.loading import load_for_training
    from test_preference import LORA, loss_and_grads

    folder = qwen35_folder(tmp_path, multimodal=False)
    tiny_random_model(folder).save_pretrained(folder)
    pairs = prepare(example_path("preference"), folder, DataConfig(max_seq_length=256, cache=False))
    batch = pairs.batch_of(np.concatenate([pairs.row_samples(r) for r in range(pairs.num_rows)]))
    torch.manual_seed(0)
    tm = load_for_training(folder, TrainConfig(method="orpo", **LORA))
    with torch.no_grad():
        for name, p in tm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    shared = loss_and_grads(tm, TrainConfig(method="orpo", **LORA), pairs, batch)
    apart = loss_and_grads(tm, TrainConfig(method="orpo", shared_prompt=False, **LORA), pairs, batch)
    assert shared[0] == pytest.approx(apart[0], rel=1e-5)
    assert any("linear_attn" in name for name in shared[1])
    for name, grad in shared[1].items():
        torch.testing.assert_close(grad, apart[1][name], rtol=1e-4, atol=1e-6)


def test_tokenization_and_assistant_mask_with_the_qwen35_template(tmp_path):
    """A `qwen3_5` folder tokenizes as transformers loads it; the Qwen3.5 template's mask keeps each answer."""
    from transformers import AutoTokenizer

    folder = qwen35_folder(tmp_path, multimodal=True)
    hf = AutoTokenizer.from_pretrained(folder)
    ours = DataTokenizer(str(folder))
    assert type(hf).__name__ == "Qwen3_5Tokenizer" and len(hf) == 248077
    for text in TEXTS:
        assert ours.encode(text)[0] == hf(text, add_special_tokens=False)["input_ids"], text
    # The ids llama.cpp records for the published tokenizer on its check text, from both.
    for ids in (ours.encode(LLAMA_CPP_CHECK_TEXT)[0], hf(LLAMA_CPP_CHECK_TEXT, add_special_tokens=False)["input_ids"]):
        assert hashlib.sha256(str(list(ids)).encode()).hexdigest() == QWEN35_CHECK_HASH
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    ds = prepare(data, folder, DataConfig(cache=False))
    expected = hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert ds.input_ids.tolist() == list(expected)
    # The generation prompt ends in "<think>\n": the last answer closes the empty thought itself.
    runs = labelled_runs(hf, ds.input_ids, ds.labels)
    assert runs == ["I am a bot.<|im_end|>\n", "</think>\n\nIt is 4.<|im_end|>\n"]


def test_cuda_graphs_are_not_captured_over_linear_attention(tmp_path):
    """The delta rule sizes its work from the boundaries on the host, which a captured graph cannot replay."""
    from backpropagate.config import TrainConfig
    from backpropagate.train.torch.loading import TrainingModel
    from backpropagate.train.torch.loop import graph_obstacle
    from backpropagate.train.torch.losses import SftObjective

    model = tiny_random_model(qwen35_folder(tmp_path, multimodal=False))
    tm = TrainingModel(model, torch.device("cuda"), "lora", torch.bfloat16, False, 0)
    reason = graph_obstacle(tm, SftObjective(), TrainConfig(cuda_graphs=True, lora_dropout=0.0))
    assert reason == "linear-attention layers size their kernels from the sample boundaries on the host"


@pytest.mark.parametrize("size", ["0.8b", "2b", "4b"])
def test_presets(size):
    from backpropagate.presets import find_preset

    preset = find_preset(f"qwen3.5-{size}")
    assert preset is not None and preset.model_id == f"Qwen/Qwen3.5-{size.upper()}"
    assert find_preset(preset.model_id) == preset


PROMPTS = ["alpha beta gamma #3? The answer is", "The quick brown fox jumps over the lazy dog.", "12345 + 678 ="]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Qwen3.5 with weights large enough for distinct top-5s, LoRA-trained on every linear layer."""
    tmp_path = tmp_path_factory.mktemp("qwen35-trained")
    folder = qwen35_folder(tmp_path, multimodal=False)
    model = tiny_random_model(folder)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif p.dim() == 2:
                p.mul_(10)
    model.save_pretrained(folder)
    result = trained_on_chat_rows(folder, tmp_path)
    return folder, Path(result.adapter_dir)


@pytest.mark.parametrize(("quantization", "atol"), [("f16", 2e-2), ("q8_0", 0.3)])
def test_trained_adapter_exports_to_llama_cpp_qwen35_with_transformers_top5(trained, quantization, atol):
    """The merged GGUF (value heads tiled, A as -exp(A_log), 1 + weight norms) gives llama.cpp's
    qwen35 the next-token log-probabilities and greedy text that transformers + peft give. In f16
    the top-5 is the same list as transformers' on the weights the GGUF holds (merged, matrices
    rounded to f16): over 248k tokens, candidates 1e-3 nats apart are common and the rounding
    alone can swap them. q8_0 rounds weights and activations of these 32-wide layers by
    up to 0.25 nats (a Qwen3 of the same width by 0.18) and so reorders candidates closer than
    that: there transformers' top token is among llama.cpp's five, which score as transformers
    scores them within that rounding."""
    pytest.importorskip("xllamacpp")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backpropagate.export import export
    from backpropagate.generate import GGUFModel

    base, adapter = trained
    targets = set(json.loads((adapter / "adapter_config.json").read_text())["target_modules"])
    assert {"in_proj_qkv", "in_proj_z", "in_proj_a", "out_proj"} <= targets
    gguf = export(adapter, "gguf", quantization=quantization).path
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    if quantization == "f16":  # the weights as the GGUF holds them: merged, matrices rounded (conv kernels stay f32)
        model = model.merge_and_unload()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2 and ".conv1d." not in name:
                    p.copy_(p.half().float())
    tok = AutoTokenizer.from_pretrained(base)
    llm = GGUFModel(gguf, n_ctx=256)
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            greedy = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :]
        assert llm.tokenize(text) == ids
        got = llm.top_logprobs(text, 5)
        want = torch.topk(logp, 5).indices.tolist()
        assert [t for t, _ in got] == want if quantization == "f16" else want[0] in dict(got), text
        np.testing.assert_allclose([v for _, v in got], logp[[t for t, _ in got]].numpy(), atol=atol)
        if quantization == "f16":
            assert llm.complete(text, max_tokens=8).text == tok.decode(greedy), text


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"rope_parameters": {**TEXT["rope_parameters"], "mrope_section": [11, 11, 10]}}, "rope sections"),
        ({"layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention"]}, "types[3]"),
        ({"linear_value_head_dim": 16}, "linear_value_head_dim 16"),
    ],
    ids=["rope-sections", "layer-types", "head-sizes"],
)
def test_layouts_llama_cpp_cannot_run_are_refused_with_a_coded_error(tmp_path, change, reason):
    """Published Qwen3.5 layouts export; one llama.cpp's qwen35 would run differently is refused
    before anything is written (here: sections wider than a 16-wide head, full attention on
    layer 2 but not 4, key and value heads of two sizes)."""
    from backpropagate.errors import InputError
    from backpropagate.export import export

    folder = qwen35_folder(tmp_path, multimodal=True)
    tiny_random_model(folder).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", config)
    text.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError) as err:
        export(folder, "gguf", quantization="f32")
    assert err.value.code == "INPUT_UNSUPPORTED_ARCHITECTURE" and reason in err.value.message
    assert not any(tmp_path.rglob("*.gguf"))


def test_image_text_model_exports_its_text_tower_to_llama_cpp(tmp_path):
    """The published Qwen3.5 checkpoints are `Qwen3_5ForConditionalGeneration`: the GGUF holds the
    text tower (`model.language_model.*`, `model.visual.*` left out) and predicts what it does."""
    pytest.importorskip("xllamacpp")
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from backpropagate import _core
    from backpropagate.generate import GGUFModel

    folder = qwen35_folder(tmp_path, multimodal=True)
    config = Qwen3_5Config.from_pretrained(folder)
    torch.manual_seed(0)
    model = Qwen3_5ForConditionalGeneration(config).float()
    with torch.no_grad():
        for name, p in model.model.language_model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif p.dim() == 2:
                p.mul_(10)
    model.save_pretrained(folder)
    prefixes = {".".join(name.split(".")[:2]) for name in load_file(folder / "model.safetensors")}
    assert {"model.visual", "model.language_model"} <= prefixes
    gguf = tmp_path / "qwen35.gguf"
    _core.convert_to_gguf(str(folder), str(gguf), "f32")
    llm = GGUFModel(gguf, n_ctx=256)
    tok = AutoTokenizer.from_pretrained(folder)
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
        want = torch.topk(logp, 5)
        got = llm.top_logprobs(text, 5)
        assert [t for t, _ in got] == want.indices.tolist(), text
        np.testing.assert_allclose([v for _, v in got], want.values.numpy(), atol=1e-3)


def test_other_gated_deltanet_layouts_are_refused_on_packed_rows():
    """Qwen3-Next's layer fuses its projections differently: packing it would leak state, so it is refused."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    from backpropagate.train.torch.linear_attention import packed_linear_attention

    config = Qwen3NextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        layer_types=["linear_attention"],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        num_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    )
    with pytest.raises(InputError) as err, packed_linear_attention(Qwen3NextForCausalLM(config)):
        pass
    assert err.value.code == "INPUT_UNSUPPORTED_ARCHITECTURE"
    assert "Qwen3NextGatedDeltaNet" in str(err.value)
