"""Mistral v0.3 from its own SentencePiece model: the token ids of a chat are those of Mistral's reference.

Mistral's `mistral-common` encodes v0.3 conversations itself (its v3 instruct tokenizer:
`[INST]` as the control token, each text segment with SentencePiece's word prefix, the system
text opening the last user message). The folder (`packaged_tokenizers.mistral_v03_folder`) is
v0.3's model converted as transformers converts it; as a complete folder (config.json with
`model_type: mistral`) through its template, transformers and our data engine must give exactly
those ids, so training sees the prompts the model was tuned on. (A control token written out
in a message is the one known difference: mistral-common encodes it as text, a tokenizer.json
as the token.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backpropagate.data import DataConfig, prepare
from test_families import family_folder

pytest.importorskip("mistral_common")

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there, who are you?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there, who are you?"},
        {"role": "assistant", "content": "I am a bot."},
        {"role": "user", "content": "What is 2+2?  Tell me\nplease, ünïcödé 中文 🦙."},
    ],
    [
        {"role": "user", "content": " leading space, [brackets]"},
        {"role": "assistant", "content": "Code:\n    def f(x):\n        return x ** 2\n"},
        {"role": "user", "content": "Thanks!"},
    ],
]


def reference_ids(messages: list[dict]) -> list[int]:
    """mistral-common's v3 encoding of a conversation that ends with a user turn (the generation prompt)."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return list(MistralTokenizer.v3().encode_chat_completion(request).tokens)


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one-turn", "system-multi-turn", "spaces-and-code"])
def test_prompts_are_mistral_commons(messages: list[dict], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(family_folder("mistral", tmp_path))
    assert hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"] == reference_ids(
        messages
    )


@pytest.mark.parametrize("messages", [CONVERSATIONS[0], CONVERSATIONS[2]], ids=["one-turn", "spaces-and-code"])
def test_training_rows_are_mistral_commons(messages: list[dict], tmp_path: Path) -> None:
    """The prompt, then the answer as v3 encodes an assistant turn: its text, then </s>.

    (With a system message the template puts it in the last user turn only when that turn ends
    the conversation, so a training row loses it: transformers renders it so, and so do we.)
    """
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    answer = "It is 4, as always."
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [*messages, {"role": "assistant", "content": answer}]}) + "\n")
    ds = prepare(data, family_folder("mistral", tmp_path), DataConfig(cache=False))
    spm = MistralTokenizer.v3().instruct_tokenizer.tokenizer
    assert ds.input_ids.tolist() == reference_ids(messages) + spm.encode(answer, bos=False, eos=True)


def test_rows_whose_template_drops_the_system_message_are_reported(tmp_path: Path, caplog) -> None:
    """Mistral's template keeps a system message only when a user turn ends the conversation: said, not silent."""
    from backpropagate.cli.validate_cmd import render
    from backpropagate.data.validate import validate

    answer = {"role": "assistant", "content": "It is 4."}
    data = tmp_path / "chat.jsonl"
    rows = [[*CONVERSATIONS[1], answer], [*CONVERSATIONS[0], answer], [*CONVERSATIONS[1], answer]]
    data.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    folder = family_folder("mistral", tmp_path)
    with caplog.at_level("WARNING", logger="backpropagate"):
        ds = prepare(data, folder, DataConfig(cache=False))
    assert ds.stats["system_left_out"] == 2
    assert "left out the system message of 2 of 3 rows" in caplog.text
    report = validate(data, folder)
    assert report["tokens"]["system_left_out"] == 2
    assert "left out the system message of 2 rows" in render(report)  # `backprop validate --model`
