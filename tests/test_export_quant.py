"""Quantized GGUF bytes are llama.cpp's bytes.

Every quantized tensor our writer emits is compared with what llama.cpp's quantizer
(`ggml_quantize_chunk` of the installed llama.cpp) makes from the same f32 input, after the
same Q/K permutation (Q4_K and Q6_K come from our own kernels, so rows that take the rare
branches of llama.cpp's search are checked too). Whole files are also compared with
`llama_model_quantize` run on our f32 GGUF, which checks llama.cpp's per-tensor type choices
too: through llama-cpp-python when installed, else through the `llama-quantize` tool named by
$LLAMA_QUANTIZE or found on PATH (`benches/convert_vs_llamacpp.py` builds one).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from export_models import build_model

xllamacpp = pytest.importorskip("xllamacpp")
gguf = pytest.importorskip("gguf")

# user-facing name -> llama.cpp's `enum llama_ftype`
FTYPES = {
    "q8_0": 7,
    "q4_k_m": 15,
    "q5_k_m": 17,
    "q6_k": 18,
    "q4_0": 2,
    "q5_0": 8,
    "q3_k_m": 12,
    "q2_k": 10,
    "iq4_nl": 25,
    "iq4_xs": 30,
}
QUANTS = list(FTYPES)
GGML_TYPE_IDS = {
    "Q4_0": 2,
    "Q5_0": 6,
    "Q5_1": 7,
    "Q8_0": 8,
    "Q2_K": 10,
    "Q3_K": 11,
    "Q4_K": 12,
    "Q5_K": 13,
    "Q6_K": 14,
    "IQ4_NL": 20,
    "IQ4_XS": 23,
}


def _ggml() -> ctypes.CDLL:
    lib = ctypes.CDLL(xllamacpp.xllamacpp.__file__)
    fn = lib.ggml_quantize_chunk
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    fn.argtypes += [ctypes.c_void_p]
    fn.restype = ctypes.c_size_t
    return lib


def _llama_cpp_quantize(lib: ctypes.CDLL, type_name: str, rows: np.ndarray, row_bytes: int) -> bytes:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    out = np.zeros(rows.shape[0] * row_bytes, dtype=np.uint8)
    n = lib.ggml_quantize_chunk(
        GGML_TYPE_IDS[type_name], rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], None
    )
    assert n == out.size
    return out.tobytes()


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's converter: reshape(heads, 2, rows/heads/2, ...).swapaxes(1, 2)
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_to_gguf(name: str) -> str | None:
    parts = {
        "model.embed_tokens.weight": "token_embd.weight",
        "lm_head.weight": "output.weight",
        "model.norm.weight": "output_norm.weight",
    }
    if name in parts:
        return parts[name]
    table = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    _, _, layer, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{table[module]}.{kind}"


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """A bf16 llama whose rows are whole k-quant blocks (hidden 256), 8 layers, untied."""
    return build_model(
        "llama",
        tmp_path_factory.mktemp("wide") / "m",
        hidden=256,
        layers=8,
        dtype="bfloat16",
        std=0.05,
        tokenizer_dir=tiny_llama,
        tie_word_embeddings=False,
        rope_scaling=None,
    )


@pytest.fixture(scope="module")
def wide_tied_qwen2(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2: Path) -> Path:
    """A bf16 qwen2 with tied embeddings (token_embd takes the output's type), 3 layers."""
    return build_model(
        "qwen2",
        tmp_path_factory.mktemp("wide-q") / "m",
        hidden=256,
        layers=3,
        dtype="bfloat16",
        std=0.05,
        tokenizer_dir=tiny_qwen2,
        tie_word_embeddings=True,
    )


def _source_f32(model_dir: Path) -> dict[str, np.ndarray]:
    import torch
    from safetensors.torch import load_file

    sd = load_file(str(model_dir / "model.safetensors"))
    out = {}
    for name, t in sd.items():
        w = t.to(torch.float32).numpy()
        if name.endswith("q_proj.weight"):
            w = _permute(w, 4)
        elif name.endswith("k_proj.weight"):
            w = _permute(w, 2)
        out[_hf_to_gguf(name)] = w
    return out


def _assert_llama_cpp_bytes(model_dir: Path, quant: str, out: Path) -> set[str]:
    """Exports `model_dir` as `quant` and checks every tensor against llama.cpp's quantizer;
    returns the quantized types seen."""
    from backpropagate import _core

    report = _core.convert_to_gguf(str(model_dir), str(out), quant, llama_cpp_lib=xllamacpp.xllamacpp.__file__)
    lib = _ggml()
    src = _source_f32(model_dir)
    reader = gguf.GGUFReader(out)
    seen: set[str] = set()
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind == "F32":
            np.testing.assert_array_equal(np.asarray(t.data).reshape(src[t.name].shape), src[t.name])
            continue
        rows = src[t.name]
        want = _llama_cpp_quantize(lib, kind, rows, int(t.n_bytes) // rows.shape[0])
        assert bytes(np.asarray(t.data).tobytes()) == want, t.name
        seen.add(kind)
    assert sum(report["types"].values()) == len(reader.tensors)
    return seen


@pytest.mark.parametrize("quant", QUANTS)
def test_quantized_tensors_are_llama_cpp_bytes(quant: str, wide_llama: Path, tmp_path: Path) -> None:
    seen = _assert_llama_cpp_bytes(wide_llama, quant, tmp_path / f"{quant}.gguf")
    if quant in ("q4_k_m", "q5_k_m"):
        # the mixes give output, some attn_v and some ffn_down more bits
        assert "Q6_K" in seen and len(seen) >= 2
    if quant in ("q3_k_m", "q2_k", "iq4_xs"):
        # low-bit mixes keep more bits where llama.cpp does (attn_v, ffn_down, attn_output)
        assert {"Q4_K", "Q5_K", "Q3_K"} & seen and len(seen) >= 3


def _edge_rows(width: int, rng: np.random.Generator) -> np.ndarray:
    """Rows that take the rare branches of the k-quant searches: flat and all-zero groups,
    one-signed groups, a lone spike, values whose scales underflow f16, large values, and
    values on rounding ties."""
    base = (rng.standard_normal(width) * 0.05).astype(np.float32)
    mixed = base.copy()
    mixed[:16] = 0.0
    mixed[32:64] = 0.25
    mixed[64:80] = -0.25
    return np.stack(
        [
            np.zeros(width),
            np.full(width, 0.3),
            np.full(width, -0.3),
            np.where(np.arange(width) == 5, 1.0, 0.0),
            base * 1e-30,
            base * 1e-8,
            base * 1e17,
            -np.abs(base),
            np.abs(base),
            np.round(base * 40) / 8,
            mixed,
        ]
    ).astype(np.float32)


@pytest.fixture(scope="module")
def edge_llama(tmp_path_factory: pytest.TempPathFactory, wide_llama: Path) -> Path:
    """`wide_llama` in f32 with `_edge_rows` at the top of every matrix."""
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("edge") / "m"
    shutil.copytree(wide_llama, out)
    rng = np.random.default_rng(0)
    tensors = {}
    for name, t in load_file(str(wide_llama / "model.safetensors")).items():
        w = t.to(torch.float32).numpy().copy()
        if w.ndim == 2:
            edge = _edge_rows(w.shape[1], rng)
            w[: len(edge)] = edge
        tensors[name] = torch.from_numpy(w)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("quant", ["q4_k_m", "q6_k", "q8_0"])
def test_edge_rows_are_llama_cpp_bytes(quant: str, edge_llama: Path, tmp_path: Path) -> None:
    """Q4_K and Q6_K are computed by our own lane-parallel kernels: every branch of
    llama.cpp's reference search must give the same bytes."""
    seen = _assert_llama_cpp_bytes(edge_llama, quant, tmp_path / f"{quant}.gguf")
    assert seen >= ({"Q6_K"} if quant == "q6_k" else {"Q8_0"} if quant == "q8_0" else {"Q4_K", "Q6_K"})


def _llama_model_quantize() -> Callable[[Path, Path, str], None]:
    """llama.cpp's `llama_model_quantize` on 2 threads, from llama-cpp-python or the
    `llama-quantize` tool; skips the test when neither is there."""
    tool = os.environ.get("LLAMA_QUANTIZE") or shutil.which("llama-quantize")
    if tool:

        def run_tool(src: Path, dst: Path, quant: str) -> None:
            subprocess.run([tool, str(src), str(dst), quant.upper(), "2"], check=True, capture_output=True)

        return run_tool
    llama_cpp = pytest.importorskip("llama_cpp", reason="neither llama-cpp-python nor llama-quantize is installed")

    def run(src: Path, dst: Path, quant: str) -> None:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = FTYPES[quant], 2
        assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0

    return run


@pytest.mark.parametrize("model", ["wide_llama", "wide_tied_qwen2", "tiny_llama"])
def test_whole_files_match_llama_model_quantize(model: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Types chosen per tensor and their bytes equal llama.cpp's `llama_model_quantize`
    (a separate llama.cpp build) run on our f32 GGUF: k-quant rows, tied embeddings, and
    rows too narrow for k-quants (fallbacks)."""
    quantize = _llama_model_quantize()
    from backpropagate import _core

    model_dir: Path = request.getfixturevalue(model)
    f32 = tmp_path / "f32.gguf"
    _core.convert_to_gguf(str(model_dir), str(f32), "f32")
    for quant in FTYPES:
        ref = tmp_path / f"ref-{quant}.gguf"
        quantize(f32, ref, quant)
        ours = tmp_path / f"ours-{quant}.gguf"
        _core.convert_to_gguf(str(model_dir), str(ours), quant, llama_cpp_lib=xllamacpp.xllamacpp.__file__)
        a = {t.name: t for t in gguf.GGUFReader(ref).tensors}
        b = {t.name: t for t in gguf.GGUFReader(ours).tensors}
        assert list(a) == list(b)
        for name, t in a.items():
            assert t.tensor_type == b[name].tensor_type, (quant, name)
            assert np.asarray(t.data).tobytes() == np.asarray(b[name].data).tobytes(), (quant, name)
