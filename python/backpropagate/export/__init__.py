"""Export a trained model: PEFT adapter, merged weights, or GGUF (+ Ollama).

`export(source, fmt)` takes an adapter folder (or a full model folder) and writes one
output, always with a model card beside it, always atomically, never over an existing
output unless `force` (a GGUF that the same source and type made earlier is reused). GGUF
is written by the Rust core, streaming the base weights and merging the adapter on the
fly; quantized types use llama.cpp's own kernels. Merged weights are streamed too
(`merged.py`); `hub.push` uploads any export to the Hugging Face Hub.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from backpropagate import log
from backpropagate.errors import ConfigError, StateError
from backpropagate.export import provenance
from backpropagate.export.card import copy_loss_curve, render_card
from backpropagate.export.files import atomic_dir, remove_leftovers, tree_size, write_text_atomic
from backpropagate.export.ollama import OllamaOutcome, chat_format, modelfile_text, register
from backpropagate.export.source import TOKENIZER_FILES, ExportSource, open_source
from backpropagate.runs.record import recorded_export

Format = Literal["lora", "merged", "gguf"]
Progress = Callable[[int, int], object]
FORMATS = ("lora", "merged", "gguf")
DEFAULT_GGUF_QUANTIZATION = "q8_0"


@dataclass
class ExportResult:
    """What an export wrote."""

    format: str
    path: Path
    files: list[Path]
    quantization: str | None
    size_bytes: int
    model_card: Path
    seconds: float
    tensor_types: dict[str, int] = field(default_factory=dict)
    modelfile: Path | None = None
    ollama: OllamaOutcome | None = None
    reused: bool = False


def _default_output(src: ExportSource, fmt: str) -> Path:
    return src.path.parent / f"{src.path.name}-{fmt}"


def _gguf_file_name(src: ExportSource, quantization: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", src.base_model.split("/")[-1]).strip("-") or "model"
    return f"{stem}-{quantization}.gguf"


def _write_card(src: ExportSource, folder: Path, fmt: str, quantization: str | None, files: list[str]) -> Path:
    text = render_card(
        title=f"{src.base_model} fine-tune",
        fmt=fmt,
        quantization=quantization,
        base_model=src.base_model,
        run=src.run,
        files=files,
    )
    card = folder / "README.md"
    write_text_atomic(card, text)
    copy_loss_curve(src.run, src.path, folder)
    return card


def _export_lora(src: ExportSource, out: Path, force: bool) -> list[Path]:
    if src.adapter_dir is None:
        raise ConfigError(
            "CONFIG_INVALID_SETTING", f"{src.path}: a full model has no adapter; export 'merged' or 'gguf'"
        )
    with atomic_dir(out, force) as tmp:
        for item in src.adapter_dir.iterdir():
            if item.is_file() and item.name != "README.md":
                shutil.copy2(item, tmp / item.name)
        for name in TOKENIZER_FILES:
            if not (tmp / name).exists() and (src.model_dir / name).is_file():
                shutil.copy2(src.model_dir / name, tmp / name)
        names = sorted(p.name for p in tmp.iterdir())
        _write_card(src, tmp, "lora", None, names)
    return sorted(out.iterdir())


def _export_merged(src: ExportSource, out: Path, force: bool) -> list[Path]:
    from backpropagate.export.merged import write_merged

    with atomic_dir(out, force) as tmp:
        write_merged(src, tmp)
        _write_card(src, tmp, "merged", "bf16", sorted(p.name for p in tmp.iterdir()))
    return sorted(out.iterdir())


def _gguf_target(src: ExportSource, out: Path, quantization: str) -> Path:
    return out if out.suffix == ".gguf" else out / _gguf_file_name(src, quantization)


def _remove_leftovers_beside(src: ExportSource, target: Path) -> None:
    """Clears what a killed export of `target` left among the files written beside it."""
    curve = (src.run or {}).get("loss_curve")
    names = [target.name, provenance.record_path(target).name, "README.md", "Modelfile"]
    removed = remove_leftovers(target.parent, names + ([curve] if isinstance(curve, str) else []))
    for path in removed:
        log.get_logger(__name__).info("removed %s, left by an interrupted export", path)


def _export_gguf(
    src: ExportSource, target: Path, quantization: str, force: bool, progress: Progress | None
) -> tuple[dict[str, int], bool]:
    """Writes (or reuses) the GGUF; returns its tensor types and whether it was reused."""
    from backpropagate import _core
    from backpropagate.export.llama_cpp import library_path

    wanted = provenance.describe(src, quantization)
    if target.exists() and not force:
        reason = provenance.why_not_reusable(target, wanted)
        if reason is None:
            log.get_logger(__name__).info("%s was made from the same source and type: reused", target)
            return provenance.recorded_types(target), True
        raise StateError("STATE_OUTPUT_EXISTS", f"{target}: already exists and {reason}")
    lib = library_path() if quantization not in ("f32", "f16", "bf16") else None
    report = _core.convert_to_gguf(
        str(src.model_dir),
        str(target),
        quantization,
        adapter_dir=str(src.adapter_dir) if src.adapter_dir else None,
        force=force,
        llama_cpp_lib=str(lib) if lib else None,
        name=src.base_model.split("/")[-1],
        tokenizer_dir=str(src.tokenizer_dir),
        progress=progress,
    )
    mb = report["bytes"] / 1e6
    log.get_logger(__name__).info(
        "wrote %s (%.1f MB, %d tensors) in %.1f s", target, mb, report["tensors"], report["seconds"]
    )
    types = dict(report["types"])
    provenance.write_record(target, wanted, types)
    return types, False


@recorded_export
def export(
    source: str | Path,
    fmt: Format,
    output: Path | None = None,
    quantization: str | None = None,
    force: bool = False,
    ollama: bool = False,
    ollama_name: str | None = None,
    ollama_host: str | None = None,
    system: str | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Exports an adapter (or full model) folder.

    Args:
        source: A PEFT adapter folder (adapter_config.json) or a full model folder.
        fmt: "lora" (the adapter, ready for PEFT), "merged" (bf16 HF folder) or "gguf".
        output: Folder to write (for gguf, a folder or a `.gguf` file path). Defaults to
            a sibling of `source` named `<source>-<fmt>`.
        quantization: For gguf: f32, f16, bf16, q8_0, llama.cpp's mixes q4_k_m, q5_k_m,
            q6_k, q4_0, q5_0, q3_k_m, q2_k, iq4_nl or iq4_xs (default q8_0).
        force: Overwrite an existing output. Without it, a GGUF that this same source and
            type made earlier (see `provenance`) is reused instead of refused.
        ollama: Also write a Modelfile and register the GGUF with Ollama (gguf only).
        ollama_name: Model name in Ollama (default: the GGUF file's stem).
        ollama_host: Ollama's address (default: OLLAMA_HOST or http://127.0.0.1:11434).
        system: System prompt for the Modelfile (default: the template's own default).
        progress: Called as `progress(tensors_done, tensors_total)` while a GGUF is written.

    Raises:
        StateError: STATE_OUTPUT_EXISTS when the output exists, `force` is off and (for
            gguf) it was not made from this source with this type.
        DependencyError: DEP_OLLAMA_REGISTRATION_FAILED when Ollama does not answer (the
            GGUF and Modelfile are written; the message has the command to finish by hand).
    """
    started = time.monotonic()
    if fmt not in FORMATS:
        raise ConfigError("CONFIG_INVALID_SETTING", f"format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt != "gguf" and quantization not in (None, "bf16"):
        raise ConfigError("CONFIG_INVALID_SETTING", f"--quantization applies to gguf exports, not {fmt}")
    if ollama and fmt != "gguf":
        raise ConfigError("CONFIG_INVALID_SETTING", "--ollama needs --format gguf")
    if fmt == "gguf" and quantization is not None:
        from backpropagate import _core

        if quantization.lower() not in _core.gguf_quantizations():
            raise ConfigError(
                "CONFIG_INVALID_SETTING",
                f"quantization {quantization!r} is not supported; choose one of {', '.join(_core.gguf_quantizations())}",
            )
    src = open_source(source)
    out = Path(output).expanduser() if output else _default_output(src, fmt)
    modelfile: Path | None = None
    outcome: OllamaOutcome | None = None
    types: dict[str, int] = {}
    reused = False
    if fmt == "lora":
        files = _export_lora(src, out, force)
        main, quant = out, None
    elif fmt == "merged":
        files = _export_merged(src, out, force)
        main, quant = out, "bf16"
    else:
        quant = (quantization or DEFAULT_GGUF_QUANTIZATION).lower()
        chat = chat_format(src.tokenizer_dir) if ollama else None
        main = _gguf_target(src, out, quant)
        _remove_leftovers_beside(src, main)
        types, reused = _export_gguf(src, main, quant, force, progress)
        folder = main.parent
        files = [main, provenance.record_path(main)]
        if chat is not None:
            modelfile = folder / "Modelfile"
            write_text_atomic(modelfile, modelfile_text(main.name, chat, system))
            files.append(modelfile)
        files.append(_write_card(src, folder, "gguf", quant, [p.name for p in files]))
        if chat is not None and modelfile is not None:
            outcome = register(main, ollama_name or main.stem, chat, system, modelfile, ollama_host)
    card = (main if main.is_dir() else main.parent) / "README.md"
    return ExportResult(
        format=fmt,
        path=main,
        files=files,
        quantization=quant,
        size_bytes=tree_size(main),
        model_card=card,
        seconds=time.monotonic() - started,
        tensor_types=types,
        modelfile=modelfile,
        ollama=outcome,
        reused=reused,
    )


__all__ = ["FORMATS", "ExportResult", "export"]
