"""Chat templates: minijinja renders real templates like transformers, and assistant masks
are right token by token for five real families."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from backpropagate import _core
from backpropagate.data import IGNORE_INDEX, DataConfig, prepare
from backpropagate.data import reference as ref
from conftest import TOKENIZERS, real_tokenizer

TEMPLATES = sorted((TOKENIZERS / "chat-templates").rglob("*.jinja"))
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ],
    [{"role": "user", "content": "Think first"}, {"role": "assistant", "content": "<think>hmm, ok</think>Done."}],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call12345",
                    "type": "function",
                    "function": {"name": "weather", "arguments": {"city": "Paris", "days": 2}},
                }
            ],
        },
        {"role": "tool", "content": '{"temp": 21.5}', "tool_call_id": "call12345", "name": "weather"},
        {"role": "assistant", "content": "It is 21.5 °C in Paris."},
    ],
]


def transformers_render(template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    out, _ = render_jinja_template(
        conversations=[messages], chat_template=template, add_generation_prompt=add_generation_prompt, **SPECIALS
    )
    return out[0]


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_real_template_renders_like_transformers(path: Path):
    if not TEMPLATES:
        pytest.skip("no shared chat templates")
    template = path.read_text(encoding="utf-8")
    compared = 0
    for messages in CONVERSATIONS:
        for add_generation_prompt in (False, True):
            msgs = messages if not add_generation_prompt else messages[:-1]
            try:
                expected = transformers_render(template, msgs, add_generation_prompt)
            except Exception:  # transformers cannot render this conversation with this template
                continue
            got = _core.render_chat_template(template, json.dumps(msgs), add_generation_prompt, json.dumps(SPECIALS))
            assert got == expected, (messages, add_generation_prompt)
            compared += 1
    # Templates that need a `tools` list (tool-use variants, firefunction) refuse everything here.
    if "tool_use" not in path.name and "firefunction" not in path.name:
        assert compared > 0


def test_most_real_templates_were_compared():
    assert len(TEMPLATES) >= 80 or not TEMPLATES


# ---- assistant masks of five real families ---------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there, who are you?"},
    {"role": "assistant", "content": "I am a bot."},
    {"role": "user", "content": "And 2+2?"},
    {"role": "assistant", "content": "It is 4."},
]
FAMILIES = {
    "llama-3.2-3b-instruct": ["I am a bot.<|eot_id|>", "It is 4.<|eot_id|>"],
    "qwen2.5-0.5b-instruct": ["I am a bot.<|im_end|>\n", "It is 4.<|im_end|>\n"],
    "mistral-v0.3": ["I am a bot.</s>", "It is 4.</s>"],
    "phi-3-mini": ["I am a bot.<|end|>", "It is 4.<|end|><|endoftext|>"],
    "smollm2-135m-instruct": ["I am a bot.<|im_end|>\n", "It is 4.<|im_end|>\n"],
}


def labelled_runs(tokenizer, ids: np.ndarray, labels: np.ndarray) -> list[str]:
    runs, current = [], []
    for token, label in zip(ids.tolist(), labels.tolist(), strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_assistant_mask_token_by_token(family, tmp_path):
    from transformers import AutoTokenizer

    folder = real_tokenizer(family)
    tok = AutoTokenizer.from_pretrained(folder)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps({"messages": CONVERSATION[1:]}) + "\n")
    ds = prepare(data, folder, DataConfig(cache=False))
    reference = ref.ReferenceModel(folder)
    for s, messages in enumerate((CONVERSATION, CONVERSATION[1:])):
        ids = ds.input_ids[ds.sample_offsets[s] : ds.sample_offsets[s + 1]]
        labels = ds.labels[ds.sample_offsets[s] : ds.sample_offsets[s + 1]]
        # The tokens are exactly what transformers feeds the model for this conversation.
        expected_ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert ids.tolist() == list(expected_ids)
        # Each labelled run is one assistant answer with its end-of-turn marker, nothing else.
        assert labelled_runs(tok, ids, labels) == FAMILIES[family]
        # Token by token, the mask is the one the reference derives with transformers' renderer.
        text, spans = ref.render_with_spans(reference.render, messages, 0, False)
        ref_ids, offsets = reference.encode(text)
        assert labels.tolist() == ref.labels_from_spans(ref_ids, offsets, spans)


TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call12345", "type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
        ],
    },
    {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call12345"},
    {"role": "assistant", "content": "It is 21 C."},
]


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        (
            "qwen2.5-0.5b-instruct",
            [
                '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n',
                "It is 21 C.<|im_end|>\n",
            ],
        ),
        (
            "llama-3.2-3b-instruct",
            ['{"name": "weather", "parameters": {"city": "Paris"}}<|eot_id|>', "It is 21 C.<|eot_id|>"],
        ),
    ],
)
def test_tool_calls_are_trained_and_tool_results_are_not(family, expected, tmp_path):
    from transformers import AutoTokenizer

    folder = real_tokenizer(family)
    tok = AutoTokenizer.from_pretrained(folder)
    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps({"messages": TOOL_CONVERSATION}) + "\n")
    ds = prepare(data, folder, DataConfig(cache=False))
    assert ds.input_ids.tolist() == list(
        tok.apply_chat_template(TOOL_CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    )
    assert labelled_runs(tok, ds.input_ids, ds.labels) == expected


@pytest.mark.parametrize(
    "family",
    ["llama-3.2-3b-instruct", "qwen2.5-0.5b-instruct", "mixtral-8x22b-v0.1", "phi-3-mini", "smollm2-135m-instruct"],
)
def test_raw_text_is_what_transformers_tokenizes_plus_eos(family, tmp_path):
    from transformers import AutoTokenizer

    folder = real_tokenizer(family)
    tok = AutoTokenizer.from_pretrained(folder)
    text = "Hello there, this is raw text. 12345 ünïcode"
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"text": text}) + "\n")
    ds = prepare(data, folder, DataConfig(cache=False))
    expected = tok(text)["input_ids"]
    if expected[-1] != tok.eos_token_id:
        expected.append(tok.eos_token_id)
    assert ds.input_ids.tolist() == expected
    assert np.array_equal(ds.labels, ds.input_ids)
