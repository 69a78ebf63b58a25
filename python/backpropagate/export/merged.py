"""Merged export: the adapter folded into a bf16 copy of its base, as a full HF folder.

The base is streamed tensor by tensor from its safetensors shards (read at their offsets,
never loaded whole), each adapted weight merged with the same torch operations PEFT's
`merge_and_unload` runs (so the bytes are PEFT's), and written into bf16 safetensors shards
whose headers are planned up front. Memory stays near one tensor. A QLoRA run merges into
the original bf16 base and never into 4-bit weights. Adapters this path does not cover
(embedding LoRA, LoRA biases, Conv1D layers, a replaced tied output) merge through PEFT,
which loads the whole base.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backpropagate import log
from backpropagate.errors import InputError
from backpropagate.export.source import TOKENIZER_FILES, ExportSource
from backpropagate.log import quiet_bitsandbytes_import

if TYPE_CHECKING:
    import torch

PREFIX = "base_model.model."
MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size, "5GB"
_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass(frozen=True)
class _Stored:
    """Where one tensor's bytes lie in a safetensors file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _read_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(n))
    header["__data_start__"] = 8 + n
    return header


def _index(files: list[Path]) -> dict[str, _Stored]:
    out: dict[str, _Stored] = {}
    for path in files:
        header = _read_header(path)
        base = header.pop("__data_start__")
        header.pop("__metadata__", None)
        for name, info in header.items():
            start, end = info["data_offsets"]
            out[name] = _Stored(path, info["dtype"], tuple(info["shape"]), base + start, base + end)
    return out


def _load(stored: _Stored) -> torch.Tensor:
    import torch

    if stored.dtype not in _DTYPES:
        raise InputError("INPUT_MODEL_LOAD_FAILED", f"{stored.file}: tensor dtype {stored.dtype} cannot be merged")
    data = bytearray(stored.end - stored.start)
    with stored.file.open("rb") as f:
        f.seek(stored.start)
        if f.readinto(data) != len(data):
            raise InputError("INPUT_MODEL_LOAD_FAILED", f"{stored.file}: truncated safetensors file")
    dtype = getattr(torch, _DTYPES[stored.dtype])
    return torch.frombuffer(data, dtype=dtype).reshape(stored.shape) if data else torch.empty(stored.shape, dtype=dtype)


class _Adapter:
    """A PEFT LoRA/DoRA adapter, with PEFT's scaling rules."""

    def __init__(self, folder: Path) -> None:
        self.config: dict[str, Any] = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        weights = folder / "adapter_model.safetensors"
        self.tensors = _index([weights]) if weights.is_file() else {}
        self.modules = {n[: -len(".lora_A.weight")] for n in self.tensors if n.endswith(".lora_A.weight")}

    def streamable(self, tied: bool) -> str | None:
        """None when the streamed merge covers this adapter, else why it does not."""
        if self.config.get("peft_type", "LORA") != "LORA" or not self.tensors:
            return "not a LoRA adapter in safetensors"
        if self.config.get("fan_in_fan_out"):
            return "fan_in_fan_out (Conv1D) layers"
        if any("lora_embedding_" in n or n.endswith(".lora_B.bias") for n in self.tensors):
            return "embedding LoRA or LoRA biases"
        if tied and f"{PREFIX}lm_head.weight" in self.tensors:
            return "a replaced output layer of a model with tied embeddings"
        return None

    def replacement(self, name: str) -> _Stored | None:
        """The adapter's full copy of base tensor `name` (modules_to_save)."""
        return self.tensors.get(PREFIX + name)

    def _scaling(self, module: str, r: int) -> float:
        alpha = float(self.config.get("lora_alpha", 8))
        short = module[len(PREFIX) :]
        for key, value in (self.config.get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?({key})", short):
                alpha = float(value)
                break
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def merge(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (bf16) with this adapter merged as PEFT's `merge_and_unload` does."""
        import torch

        module = PREFIX + name.removesuffix(".weight")
        if not name.endswith(".weight") or module not in self.modules:
            return weight
        # PEFT keeps adapter weights in float32 on a bf16 base (autocast_adapter_dtype).
        a = _load(self.tensors[module + ".lora_A.weight"]).float()
        b = _load(self.tensors[module + ".lora_B.weight"]).float()
        if a.shape[1] != weight.shape[1] or b.shape[0] != weight.shape[0]:
            raise InputError(
                "INPUT_ADAPTER_INVALID",
                f"{module}: factors {tuple(a.shape)} and {tuple(b.shape)} do not fit weight {tuple(weight.shape)}",
            )
        delta = (b @ a) * self._scaling(module, a.shape[0])
        magnitude = self.tensors.get(module + ".lora_magnitude_vector") or self.tensors.get(
            module + ".lora_magnitude_vector.weight"
        )
        if not self.config.get("use_dora"):
            weight += delta
            return weight
        if magnitude is None:
            raise InputError("INPUT_ADAPTER_INVALID", f"{module}: DoRA adapter without lora_magnitude_vector")
        # DoraLinearVariant.merge_unsafe with DoraLinearLayer.get_weight_norm (scaling=1).
        weight_norm = torch.linalg.norm(weight + 1 * delta, dim=1).to(torch.float32)
        factor = (_load(magnitude).float() / weight_norm).view(-1, 1)
        return (factor * (weight + delta)).to(weight.dtype)


def _shards(names: list[str], sizes: dict[str, int]) -> list[list[str]]:
    """Groups tensors into shards of at most MAX_SHARD_BYTES, in order (as transformers does)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name in names:
        if shards[-1] and used + sizes[name] > MAX_SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    return shards


def _header(names: list[str], shapes: dict[str, tuple[int, ...]]) -> bytes:
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        n = 2 * math.prod(shapes[name])
        entries[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _merged_tensors(
    names: list[str], base: dict[str, _Stored], adapter: _Adapter | None
) -> Iterator[tuple[str, torch.Tensor]]:
    import torch

    with torch.no_grad():
        for name in names:
            stored = (adapter.replacement(name) if adapter else None) or base[name]
            weight = _load(stored).to(torch.bfloat16)
            if adapter is not None:
                weight = adapter.merge(name, weight)
            yield name, weight


def _stream_merge(src: ExportSource, out_dir: Path, base: dict[str, _Stored], adapter: _Adapter | None) -> None:
    import torch

    names = list(base)
    shapes = {n: base[n].shape for n in names}
    shards = _shards(names, {n: 2 * math.prod(s) for n, s in shapes.items()})
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    tensors = _merged_tensors(names, base, adapter)
    for file, shard in zip(files, shards, strict=True):
        with (out_dir / file).open("wb") as f:
            f.write(_header(shard, shapes))
            for name in shard:
                got, tensor = next(tensors)
                assert got == name and tuple(tensor.shape) == shapes[name]
                f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
    if len(files) > 1:
        total = sum(2 * math.prod(s) for s in shapes.values())
        weight_map = {n: file for file, shard in zip(files, shards, strict=True) for n in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    config = json.loads((src.model_dir / "config.json").read_text(encoding="utf-8"))
    for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
        config[key] = "bfloat16"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _merge_through_peft(src: ExportSource, out_dir: Path, max_shard_size: str = "5GB") -> None:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(src.model_dir, dtype=torch.bfloat16)
    except Exception as exc:
        raise InputError("INPUT_MODEL_LOAD_FAILED", f"{src.model_dir}: cannot load the base model ({exc})") from exc
    if src.adapter_dir is not None:
        with quiet_bitsandbytes_import():
            from peft import PeftModel

        try:
            with quiet_bitsandbytes_import():  # peft 0.22+ imports bitsandbytes while it loads the adapter
                model = PeftModel.from_pretrained(model, src.adapter_dir).merge_and_unload()
        except Exception as exc:
            raise InputError("INPUT_ADAPTER_INVALID", f"{src.adapter_dir}: cannot merge ({exc})") from exc
    model.save_pretrained(out_dir, max_shard_size=max_shard_size, safe_serialization=True)


def write_merged(src: ExportSource, out_dir: Path) -> None:
    """Writes config, bf16 safetensors shards (+ index), generation config and tokenizer files."""
    shards = sorted(src.model_dir.glob("*.safetensors"))
    adapter = _Adapter(src.adapter_dir) if src.adapter_dir is not None else None
    config = json.loads((src.model_dir / "config.json").read_text(encoding="utf-8"))
    tied = bool(config.get("tie_word_embeddings", True))
    base = _index(shards) if shards else {}
    why = "the base has no safetensors weights" if not shards else None
    if why is None and adapter is not None:
        why = adapter.streamable(tied)
        missing = sorted(m for m in adapter.modules if m[len(PREFIX) :] + ".weight" not in base)
        if why is None and missing:
            raise InputError(
                "INPUT_ADAPTER_INVALID",
                f"adapter module {missing[0][len(PREFIX) :]} has no weight in the base model; "
                "is this adapter for a different model?",
            )
    if why is None:
        _stream_merge(src, out_dir, base, adapter)
    else:
        log.get_logger(__name__).warning("merging through PEFT, which loads the whole base: %s", why)
        _merge_through_peft(src, out_dir)
    for name in TOKENIZER_FILES:
        for folder in (src.tokenizer_dir, src.model_dir):
            if (folder / name).is_file():
                shutil.copy2(folder / name, out_dir / name)
                break
    gen = src.model_dir / "generation_config.json"
    if gen.is_file():
        shutil.copy2(gen, out_dir / "generation_config.json")
