"""Slow, readable Python twin of the Rust data engine (detection, masking, trace filter, packing).

Every step here mirrors one module of `rust/data/` and states its rule in plain Python, so
the rules can be read in one place and the fast engine can be checked against them (the
parity tests feed both the same rows, with hypothesis). Rendering uses transformers'
Jinja renderer and tokenization the transformers tokenizer, so agreement also checks the
Rust templating and tokenizer against the reference implementations of the ecosystem.
Nothing here is on a hot path.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backpropagate.data.config import DataConfig
from backpropagate.data.dataset import IGNORE_INDEX
from backpropagate.errors import InputError

ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "system": "system",
    "tool": "tool",
    "function_response": "tool",
    "observation": "tool",
    "ipython": "tool",
}
OPEN, CLOSE = "<think>", "</think>"
# Unicode White_Space: what Rust's `str::trim` strips (Python's `str.strip` differs on a few controls).
WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
# The built-in templates a user may choose (rust/data/template.rs BUILTIN_TEMPLATES).
BUILTIN_TEMPLATES = {
    "chatml": (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    "llama3": (
        "{{- bos_token if bos_token is defined else '' }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    ),
}
SENTINEL = "\ue000\ue001bp-content\ue001\ue000"

Message = dict[str, Any]


# ---- detection (rust/data/detect.rs) ------------------------------------------------------


@dataclass
class Chat:
    """Messages rendered with the template; assistant messages from `label_from` on carry a loss."""

    messages: list[Message]
    label_from: int


@dataclass
class Raw:
    """Text tokenized as is; every token carries a loss."""

    text: str


@dataclass
class Detected:
    """A recognised row: its format, one or two sample specs, and the KTO label."""

    format: str
    specs: list[Chat | Raw]
    kto_label: bool | None = None

    @property
    def kind(self) -> str:
        """Training kind of the row."""
        return {"preference": "preference", "kto": "kto"}.get(self.format, "sft")


# Reasons of bad rows in the dropped counts (rust/data/bad.rs).
PARSE_ERROR, NOT_AN_OBJECT, UNKNOWN_FORMAT = "parse_error", "not_an_object", "unknown_format"
MISSING_FIELD, WRONG_FIELD_TYPE, INVALID_VALUE = "missing_field", "wrong_field_type", "invalid_value"


class RowError(ValueError):
    """A bad or dropped row; `reason` names it in the dropped counts (the message by default)."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


def detect(row: Any) -> Detected:
    """Recognises a row's shape; the first matching shape in this order wins."""
    if not isinstance(row, dict):
        raise RowError("not a JSON object", NOT_AN_OBJECT)
    if "messages" in row:
        return Detected("messages", [Chat(_messages(row["messages"], "messages", sharegpt=False), 0)])
    if "conversations" in row:
        return Detected("sharegpt", [Chat(_messages(row["conversations"], "conversations", sharegpt=True), 0)])
    if "chosen" in row or "rejected" in row:
        return _preference(row)
    if "completion" in row or "label" in row:
        return _kto(row)
    if "instruction" in row or "output" in row:
        return Detected("alpaca", [Chat(_alpaca(row), 0)])
    if "text" in row:
        text = row["text"]
        if not isinstance(text, str):
            raise RowError("field 'text' must be a string", WRONG_FIELD_TYPE)
        if not text.strip(WHITE_SPACE):
            raise RowError("field 'text' is empty", INVALID_VALUE)
        return Detected("text", [Raw(text)])
    raise RowError("the row has no known shape", UNKNOWN_FORMAT)


def _messages(value: Any, field_name: str, *, sharegpt: bool) -> list[Message]:
    if not isinstance(value, list):
        raise RowError(f"field '{field_name}' must be a list of messages", WRONG_FIELD_TYPE)
    if not value:
        raise RowError(f"field '{field_name}' is an empty list", INVALID_VALUE)
    return [_message(item, f"{field_name}[{i}]", sharegpt=sharegpt) for i, item in enumerate(value)]


def _message(item: Any, at: str, *, sharegpt: bool) -> Message:
    if not isinstance(item, dict):
        raise RowError(f"'{at}' must be an object", WRONG_FIELD_TYPE)
    role_key, content_key = (
        ("from", "value") if sharegpt and ("from" in item or "role" not in item) else ("role", "content")
    )
    if role_key not in item:
        raise RowError(f"'{at}' lacks field '{role_key}'", MISSING_FIELD)
    raw_role = item[role_key]
    if not isinstance(raw_role, str):
        raise RowError(f"'{at}.{role_key}' must be a string", WRONG_FIELD_TYPE)
    role = SHAREGPT_ROLES.get(raw_role) if role_key == "from" else (raw_role if raw_role in ROLES else None)
    if role is None:
        raise RowError(f"'{at}.{role_key}' is '{raw_role}'", INVALID_VALUE)
    content = item.get(content_key)
    if content is None and ("tool_calls" in item or "function_call" in item):
        text = ""
    elif content_key not in item:
        raise RowError(f"'{at}' lacks field '{content_key}'", MISSING_FIELD)
    else:
        text = _content_text(content, f"{at}.{content_key}")
    extra = {k: v for k, v in item.items() if k not in (role_key, content_key)}
    return {"role": role, "content": text, **extra}


def _content_text(value: Any, at: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RowError(f"'{at}' must be a string or a list of text parts", WRONG_FIELD_TYPE)
    parts = []
    for i, part in enumerate(value):
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        else:
            raise RowError(f"'{at}[{i}]' is not a text part", WRONG_FIELD_TYPE)
    return "".join(parts)


def _string(row: dict[str, Any], key: str, shape: str) -> str:
    if key not in row:
        raise RowError(f"{shape} row lacks field '{key}'", MISSING_FIELD)
    if not isinstance(row[key], str):
        raise RowError(f"field '{key}' must be a string", WRONG_FIELD_TYPE)
    return row[key]


def _optional_string(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"field '{key}' must be a string", WRONG_FIELD_TYPE)
    return value


def _alpaca(row: dict[str, Any]) -> list[Message]:
    instruction = _string(row, "instruction", "an alpaca")
    output = _string(row, "output", "an alpaca")
    given = _optional_string(row, "input")
    system = _optional_string(row, "system")
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    user = f"{instruction}\n\n{given}" if given else instruction
    return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _side(row: dict[str, Any], key: str) -> str | list[Message]:
    value = row[key]
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(value, key, sharegpt=False)
    raise RowError(f"field '{key}' must be a string or a list of messages", WRONG_FIELD_TYPE)


def _as_messages(side: str | list[Message], role: str) -> list[Message]:
    return [{"role": role, "content": side}] if isinstance(side, str) else side


def _preference(row: dict[str, Any]) -> Detected:
    for key in ("chosen", "rejected"):
        if key not in row:
            raise RowError(f"a preference row lacks field '{key}'", MISSING_FIELD)
    chosen, rejected = _side(row, "chosen"), _side(row, "rejected")
    if row.get("prompt") is not None:
        prompt = _as_messages(_side(row, "prompt"), "user")
        specs: list[Chat | Raw] = [
            Chat(prompt + _as_messages(side, "assistant"), len(prompt)) for side in (chosen, rejected)
        ]
    elif isinstance(chosen, list) and isinstance(rejected, list):
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared in (len(chosen), len(rejected)):
            raise RowError("'chosen' and 'rejected' do not differ after their shared messages", INVALID_VALUE)
        specs = [Chat(chosen, shared), Chat(rejected, shared)]
    elif isinstance(chosen, str) and isinstance(rejected, str):
        specs = [Raw(chosen), Raw(rejected)]
    else:
        raise RowError("without a 'prompt', 'chosen' and 'rejected' must be of one type", WRONG_FIELD_TYPE)
    return Detected("preference", specs)


def _kto(row: dict[str, Any]) -> Detected:
    for key in ("prompt", "completion", "label"):
        if key not in row:
            raise RowError(f"a KTO row lacks field '{key}'", MISSING_FIELD)
    prompt = _as_messages(_side(row, "prompt"), "user")
    completion = _as_messages(_side(row, "completion"), "assistant")
    if not isinstance(row["label"], bool):
        raise RowError("field 'label' must be true or false", WRONG_FIELD_TYPE)
    return Detected("kto", [Chat(prompt + completion, len(prompt))], kto_label=row["label"])


# ---- masks (rust/data/mask.rs) ------------------------------------------------------------

Render = Callable[[list[Message], bool], str]


def _utf8_len(text: str) -> int:
    return len(text.encode())


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def render_with_spans(
    render: Render, messages: list[Message], label_from: int, train_all: bool
) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the byte spans of it that carry a loss.

    For assistant message i: the conversation up to i rendered with the generation
    prompt ends where the model starts writing; the rendering of the conversation up to
    and including i parts from the full one where the turn ends. When a template rewrites
    earlier turns, the message's content is replaced by a sentinel to find where it lands.
    """
    text = render(messages, False)
    if train_all:
        return text, [(0, _utf8_len(text))] if text else []
    spans: list[tuple[int, int]] = []
    for i in range(label_from, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        start, end = _assistant_span(render, messages, text, i)
        if end <= start:
            continue
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((start, end))
    return text, spans


def _assistant_span(render: Render, messages: list[Message], full: str, i: int) -> tuple[int, int]:
    prompt = render(messages[:i], True)
    upto = full if i + 1 == len(messages) else render(messages[: i + 1], False)
    if full.startswith(prompt):
        end = _common_prefix(full, upto)
        if end >= len(prompt) and messages[i]["content"].strip(WHITE_SPACE) in full[len(prompt) : end]:
            return _utf8_len(prompt), _utf8_len(full[:end])
    marked = [*messages[:i], {**messages[i], "content": SENTINEL}, *messages[i + 1 :]]
    marked_full, marked_upto = render(marked, False), render(marked[: i + 1], False)
    if SENTINEL in full or marked_full.count(SENTINEL) != 1 or marked_upto.count(SENTINEL) != 1:
        raise RowError(f"cannot locate assistant message {i + 1} in the chat template's rendering", "template_failed")
    pos = marked_full.index(SENTINEL)
    after = marked_full[pos + len(SENTINEL) :]
    content_end = len(full) - len(after)
    if content_end < pos or full[:pos] != marked_full[:pos] or full[content_end:] != after:
        raise RowError(f"cannot locate assistant message {i + 1} in the chat template's rendering", "template_failed")
    tail = _common_prefix(full[content_end:], marked_upto[marked_upto.index(SENTINEL) + len(SENTINEL) :])
    start = len(prompt) if full.startswith(prompt) and len(prompt) <= pos else pos
    return _utf8_len(full[:start]), _utf8_len(full[: content_end + tail])


def labels_from_spans(
    ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[int]:
    """A token is a target when it starts inside a span with at least half of its bytes inside."""
    labels = []
    for token, (start, end) in zip(ids, offsets, strict=True):
        hit = any(a <= start < b and 2 * (min(b, end) - start) >= end - start for a, b in spans)
        labels.append(token if hit else IGNORE_INDEX)
    return labels


# ---- trace filter (rust/data/filter.rs) ---------------------------------------------------


def trace_spans(text: str) -> list[str]:
    """Insides of the `<think>` spans of `text`; raises with the drop reason when unusable."""
    inner, depth_start, pos = [], None, 0
    while True:
        at_open, at_close = text.find(OPEN, pos), text.find(CLOSE, pos)
        if at_open < 0 and at_close < 0:
            break
        if at_open >= 0 and (at_close < 0 or at_open < at_close):
            if depth_start is not None:
                raise RowError("trace_unbalanced")
            depth_start, pos = at_open + len(OPEN), at_open + len(OPEN)
        else:
            if depth_start is None:
                raise RowError("trace_unbalanced")
            inner.append(text[depth_start:at_close])
            depth_start, pos = None, at_close + len(CLOSE)
    if depth_start is not None:
        raise RowError("trace_unbalanced")
    if not inner or any(not s.strip(WHITE_SPACE) for s in inner):
        raise RowError("trace_empty")
    return inner


# ---- packing (rust/data/pack.rs) ----------------------------------------------------------


def pack_bfd(lengths: Sequence[int], capacity: int) -> tuple[list[int], list[int]]:
    """Best-fit-decreasing: longest first, into the open row with the least room that fits.

    Ties between rows with the same room go to the row that reached that room last.
    Returns (row offsets, item indices in row order).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rooms: list[int] = []
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}
    for item in order:
        fits = [room for room, stack in by_room.items() if room >= lengths[item] and stack]
        if fits:
            row = by_room[min(fits)].pop()
        else:
            rooms.append(capacity)
            rows.append([])
            row = len(rows) - 1
        rooms[row] -= lengths[item]
        rows[row].append(item)
        by_room.setdefault(rooms[row], []).append(row)
    offsets, items = [0], []
    for r in rows:
        items.extend(r)
        offsets.append(len(items))
    return offsets, items


# ---- the whole pipeline (rust/data/prepare.rs) --------------------------------------------


@dataclass
class ReferenceResult:
    """Arrays and counts the reference pipeline produced."""

    kind: str
    samples: list[tuple[list[int], list[int]]] = field(default_factory=list)
    pair_id: list[int] = field(default_factory=list)
    chosen: list[bool] = field(default_factory=list)
    kto_label: list[int] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    formats: dict[str, int] = field(default_factory=dict)
    bad_lines: list[int] = field(default_factory=list)
    pack_offsets: list[int] = field(default_factory=list)
    pack_samples: list[int] = field(default_factory=list)

    def arrays(self) -> dict[str, np.ndarray]:
        """The result in `PreparedDataset`'s array layout."""
        lengths = [len(ids) for ids, _ in self.samples]
        return {
            "input_ids": np.array([t for ids, _ in self.samples for t in ids], dtype=np.int32),
            "labels": np.array([t for _, labels in self.samples for t in labels], dtype=np.int32),
            "sample_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "pack_offsets": np.array(self.pack_offsets, dtype=np.int64),
            "pack_samples": np.array(self.pack_samples, dtype=np.int32),
            "pair_id": np.array(self.pair_id, dtype=np.int32),
            "chosen": np.array(self.chosen, dtype=bool),
            "kto_label": np.array(self.kto_label, dtype=np.int8),
        }


class ReferenceModel:
    """A model's template and tokenizer through transformers."""

    def __init__(self, model_dir: str | Path, chat_template: str | None = None) -> None:
        """`chat_template`: a built-in name or Jinja source replacing the model's (None keeps it)."""
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        chosen = BUILTIN_TEMPLATES.get(chat_template, chat_template) if chat_template else None
        self.template: str | None = chosen or self.tokenizer.chat_template
        names = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
        self.specials = {n: getattr(self.tokenizer, n) for n in names if getattr(self.tokenizer, n, None) is not None}

    def render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        """The template's rendering, as transformers renders it.

        Raises:
            InputError: INPUT_CHAT_TEMPLATE_MISSING when the model has none and none was chosen.
        """
        from transformers.utils.chat_template_utils import render_jinja_template

        if self.template is None:
            raise InputError("INPUT_CHAT_TEMPLATE_MISSING", "the model has no chat template and none was chosen")

        rendered: Any = render_jinja_template(
            conversations=[messages],
            chat_template=self.template,
            add_generation_prompt=add_generation_prompt,
            **self.specials,
        )
        return str(rendered[0][0])

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and byte offsets (no special tokens added)."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        byte_at = np.concatenate([[0], np.cumsum([len(c.encode()) for c in text])]).astype(int).tolist()
        return enc["input_ids"], [(byte_at[s], byte_at[e]) for s, e in enc["offset_mapping"]]

    def document(self, text: str) -> list[int]:
        """A raw-text sample: the tokenizer's special tokens, the text, then EOS."""
        ids = list(self.tokenizer(text)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return ids


def _sample(model: ReferenceModel, spec: Chat | Raw, train_all: bool) -> tuple[list[int], list[int]]:
    if isinstance(spec, Raw):
        ids = model.document(spec.text)
        return ids, list(ids)
    text, spans = render_with_spans(model.render, spec.messages, spec.label_from, train_all)
    ids, offsets = model.encode(text)
    return ids, labels_from_spans(ids, offsets, spans)


def _fit(samples: list[tuple[list[int], list[int]]], config: DataConfig) -> list[tuple[list[int], list[int]]]:
    cap = config.max_seq_length
    if sum(len(ids) for ids, _ in samples) <= cap:
        return samples
    if config.overlong == "drop":
        raise RowError("overlong")
    if len(samples) == 1:
        limits = [cap]
    else:
        first, second = (len(ids) for ids, _ in samples)
        cut = min(first, cap - min(second, cap // 2))
        limits = [cut, min(second, cap - cut)]
    fitted = [(ids[:n], labels[:n]) for (ids, labels), n in zip(samples, limits, strict=True)]
    if any(all(t == IGNORE_INDEX for t in labels) for _, labels in fitted):
        raise RowError("overlong")
    return fitted


def _check_trace(model: ReferenceModel, spec: Chat | Raw, config: DataConfig) -> None:
    texts = (
        [spec.text]
        if isinstance(spec, Raw)
        else [m["content"] for m in spec.messages[spec.label_from :] if m["role"] == "assistant"]
    )
    spans, tokens, problem = 0, 0, None
    for text in texts:
        try:
            inner = trace_spans(text)
        except RowError as err:
            problem = problem or str(err)
            continue
        spans += len(inner)
        tokens += sum(len(model.encode(s)[0]) for s in inner)
    if spans == 0 or problem == "trace_unbalanced":
        raise RowError(problem or "trace_empty")
    if tokens < config.trace_min_tokens:
        raise RowError("trace_too_short")
    if tokens > config.trace_max_tokens:
        raise RowError("trace_too_long")


def _parse(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError as exc:
        raise RowError(f"malformed JSON: {exc}", PARSE_ERROR) from exc


def prepare_reference(lines: list[str], model: ReferenceModel, config: DataConfig) -> ReferenceResult:
    """Runs the reference pipeline over JSONL lines (blank lines skipped)."""
    out = ReferenceResult(kind="sft")
    kind = None
    groups: list[list[int]] = []
    pairs = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            det = detect(_parse(line))
        except RowError as err:
            out.bad_lines.append(number)
            out.dropped[err.reason] = out.dropped.get(err.reason, 0) + 1
            continue
        if kind is None:
            kind = det.kind
        elif kind != det.kind:
            raise RowError(f"line {number}: a {det.kind} row in a file of {kind} rows")
        out.formats[det.format] = out.formats.get(det.format, 0) + 1
        try:
            if config.reasoning_trace:
                for spec in det.specs:
                    _check_trace(model, spec, config)
            train_all = config.train_on == "all" and det.kind == "sft"
            samples = [_sample(model, spec, train_all) for spec in det.specs]
            if any(all(t == IGNORE_INDEX for t in labels) for _, labels in samples):
                raise RowError("no_labels")
            samples = _fit(samples, config)
        except RowError as err:
            out.dropped[err.reason] = out.dropped.get(err.reason, 0) + 1
            continue
        first = len(out.samples)
        groups.append(list(range(first, first + len(samples))))
        pair = len(samples) == 2
        for k, sample in enumerate(samples):
            out.samples.append(sample)
            out.pair_id.append(pairs if pair else -1)
            out.chosen.append(pair and k == 0)
            out.kto_label.append(-1 if det.kto_label is None else int(det.kto_label))
        pairs += int(pair)
    out.kind = kind or "sft"
    lengths = [sum(len(out.samples[s][0]) for s in g) for g in groups]
    if config.pack:
        row_offsets, order = pack_bfd(lengths, config.max_seq_length)
    else:
        row_offsets, order = list(range(len(groups) + 1)), list(range(len(groups)))
    out.pack_offsets = [0]
    for r in range(len(row_offsets) - 1):
        for g in order[row_offsets[r] : row_offsets[r + 1]]:
            out.pack_samples.extend(groups[g])
        out.pack_offsets.append(len(out.pack_samples))
    return out
