"""Sample answers to a prompts file, scored against references where the file gives them.

A prompts file is JSONL: `{"prompt": "..."}` or `{"messages": [...]}` per line, with an
optional `"reference"` answer. Messages that end with an assistant turn and carry no
`reference` use that turn as the reference (a held-out chat file works as is). Prompts are
rendered with the model's chat template and answered greedily, so runs compare fairly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backpropagate.errors import InputError
from backpropagate.evaluate.metrics import SCORES
from backpropagate.train.torch.loading import TrainingModel


@dataclass
class PromptCase:
    """One prompt (as chat messages) and its reference answer, if any."""

    messages: list[dict[str, str]]
    reference: str | None
    line: int


@dataclass
class Sample:
    """A generated answer and its scores (empty without a reference)."""

    prompt: str
    answer: str
    reference: str | None
    scores: dict[str, float]


def read_prompts(path: Path) -> list[PromptCase]:
    """Reads a prompts file, refusing bad lines with their line numbers.

    Raises:
        InputError: INPUT_FILE_NOT_FOUND, INPUT_DATASET_PARSE_FAILED (not JSON),
            INPUT_DATASET_VALIDATION_FAILED (no prompt or messages), INPUT_DATASET_EMPTY.
    """
    if not path.is_file():
        raise InputError("INPUT_FILE_NOT_FOUND", f"{path}: no such prompts file")
    cases = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError("INPUT_DATASET_PARSE_FAILED", f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        cases.append(_case(row, f"{path}:{number}", number))
    if not cases:
        raise InputError("INPUT_DATASET_EMPTY", f"{path}: no prompts in this file")
    return cases


def _case(row: Any, where: str, line: int) -> PromptCase:
    reference = row.get("reference") if isinstance(row, dict) else None
    if reference is not None and not isinstance(reference, str):
        raise InputError("INPUT_DATASET_VALIDATION_FAILED", f"{where}: 'reference' must be a string")
    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
        return PromptCase([{"role": "user", "content": row["prompt"]}], reference, line)
    messages = row.get("messages") if isinstance(row, dict) else None
    valid = (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    )
    if not valid:
        raise InputError(
            "INPUT_DATASET_VALIDATION_FAILED",
            f'{where}: expected {{"prompt": "..."}} or {{"messages": [{{"role": ..., "content": ...}}]}}',
        )
    assert isinstance(messages, list)
    if messages[-1]["role"] == "assistant" and reference is None:
        reference = messages[-1]["content"]
        messages = messages[:-1]
    if not messages:
        raise InputError("INPUT_DATASET_VALIDATION_FAILED", f"{where}: no prompt before the assistant's answer")
    return PromptCase(messages, reference, line)


@torch.no_grad()
def generate_samples(
    tm: TrainingModel, tokenizer_dir: Path, cases: list[PromptCase], max_new_tokens: int
) -> list[Sample]:
    """Greedy answers to each case, scored against its reference."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    samples = []
    for case in cases:
        if tokenizer.chat_template:
            prompt = tokenizer.apply_chat_template(case.messages, add_generation_prompt=True, tokenize=False)
        else:
            prompt = "\n".join(m["content"] for m in case.messages)
        encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=not tokenizer.chat_template)
        input_ids = encoded["input_ids"].to(tm.device)
        output = tm.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        answer = str(tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)).strip()
        scores = {name: fn(answer, case.reference) for name, fn in SCORES.items()} if case.reference is not None else {}
        samples.append(Sample(case.messages[-1]["content"], answer, case.reference, scores))
    return samples


def mean_scores(samples: list[Sample]) -> dict[str, float]:
    """Each score averaged over the samples that have a reference."""
    scored = [s.scores for s in samples if s.scores]
    return {name: sum(s[name] for s in scored) / len(scored) for name in SCORES} if scored else {}
