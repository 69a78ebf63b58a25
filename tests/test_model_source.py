import pytest

from backpropagate.errors import ConfigError, InputError
from backpropagate.model_source import resolve_model


def test_tiny_name_and_local_folder_resolve_to_the_same_folder(tiny_llama):
    assert resolve_model("tiny-llama") == tiny_llama
    assert resolve_model(str(tiny_llama)) == tiny_llama


def test_folder_without_model_files_is_refused(tmp_path):
    with pytest.raises(InputError) as err:
        resolve_model(tmp_path)
    assert err.value.code == "INPUT_MODEL_LOAD_FAILED" and str(tmp_path) in err.value.message


def test_unknown_names_are_config_errors(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("./missing-folder", "not-a-model", "nobody/surely-missing-model-xyz"):
        with pytest.raises(ConfigError) as err:
            resolve_model(name)
        assert err.value.code == "CONFIG_UNKNOWN_MODEL"


def test_a_failed_hub_fetch_is_one_line(monkeypatch):
    # No network here (or, with one, no such repo): the hub's error runs to several lines.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ConfigError) as err:
        resolve_model("nobody/surely-missing-model-xyz", weights=False)
    assert err.value.code == "CONFIG_UNKNOWN_MODEL" and "surely-missing-model-xyz" in err.value.message
    assert "\n" not in err.value.message


def _gguf_of(model_dir, out, quantization="f16"):
    from backpropagate import _core
    from backpropagate.export.llama_cpp import library_path

    lib = library_path() if quantization not in ("f32", "f16", "bf16") else None
    _core.convert_to_gguf(str(model_dir), str(out), quantization, llama_cpp_lib=str(lib) if lib else None)
    return out


def test_gguf_file_resolves_to_a_cached_hf_folder_with_the_same_model(tiny_llama, tmp_path, caplog):
    """tiny-llama -> GGUF q8_0 -> resolve_model: a folder transformers loads, with the GGUF's
    tokenizer and chat template, logits within q8_0's rounding of the original, built once."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backpropagate.gguf_source import source_record

    gguf = _gguf_of(tiny_llama, tmp_path / "tiny.gguf", "q8_0")
    with caplog.at_level("WARNING"):
        folder = resolve_model(gguf)
        assert resolve_model(str(gguf)) == folder
    warnings = [r.getMessage() for r in caplog.records if "Q8_0-quantized" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert source_record(folder) == {
        "gguf": str(gguf.resolve()),
        "quantization": "Q8_0",
        "architecture": "llama",
        "digest": folder.name.rsplit("-", 1)[1],
    }
    config = json.loads((folder / "tokenizer_config.json").read_text())
    original = json.loads((tiny_llama / "tokenizer_config.json").read_text())
    assert config["chat_template"] == original["chat_template"]
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"

    text = "The red kite flew over the hill."
    want_tok, got_tok = AutoTokenizer.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(folder)
    ids = want_tok(text)["input_ids"]
    assert got_tok(text)["input_ids"] == ids
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(torch.tensor([ids])).logits
        got = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(torch.tensor([ids])).logits
    assert torch.allclose(got, want, atol=0.05), (got - want).abs().max()
    assert got[0].argmax(-1).tolist() == want[0].argmax(-1).tolist()


def test_gguf_cache_key_follows_the_file(tiny_llama, tmp_path):
    import os

    gguf = _gguf_of(tiny_llama, tmp_path / "tiny.gguf")
    first = resolve_model(gguf)
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = resolve_model(gguf)
    assert second != first and (second / "model.safetensors").is_file()


def test_missing_or_bad_gguf_files_are_coded_errors(tmp_path):
    with pytest.raises(InputError) as err:
        resolve_model(tmp_path / "missing.gguf")
    assert err.value.code == "INPUT_FILE_NOT_FOUND"
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 100)
    with pytest.raises(InputError) as err:
        resolve_model(junk)
    assert err.value.code == "INPUT_MODEL_LOAD_FAILED" and "not a readable GGUF" in err.value.message


def test_gguf_of_an_architecture_transformers_cannot_load_is_refused(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "odd.gguf"
    writer = GGUFWriter(str(path), "madeuparch")
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InputError) as err:
        resolve_model(path)
    assert err.value.code == "INPUT_MODEL_LOAD_FAILED"
    assert "madeuparch" in err.value.message and "cannot load" in err.value.message


def test_cli_reports_a_bad_gguf_with_its_code(tmp_path):
    from backpropagate.examples import example_path
    from cli_helpers import run_cli

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 64)
    res = run_cli("validate", str(example_path("chat")), "--model", str(junk))
    assert res.status == 3
    assert "[INPUT_MODEL_LOAD_FAILED]" in res.stderr and "Traceback" not in res.stderr + res.stdout


def test_preset_uses_its_bundled_gguf_only_when_the_package_is_installed(monkeypatch, tiny_llama, tmp_path):
    """A preset names a (package, file) GGUF: found without importing the package; absent, the hub id is used."""
    import dataclasses
    import sys

    from backpropagate import presets

    package = tmp_path / "bundled_model_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    _gguf_of(tiny_llama, package / "model.gguf")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    preset = dataclasses.replace(presets.PRESETS["tiny-llama"], name="bundled-test", model_id="nobody/bundled-test-xyz")
    with_package = dataclasses.replace(preset, bundled_gguf=("bundled_model_pkg", "model.gguf"))
    monkeypatch.setitem(presets.PRESETS, "bundled-test", with_package)
    assert presets.bundled_gguf(with_package) == package / "model.gguf"
    assert (resolve_model("bundled-test") / "gguf_source.json").is_file()
    assert "bundled_model_pkg" not in sys.modules

    monkeypatch.setitem(
        presets.PRESETS, "bundled-test", dataclasses.replace(preset, bundled_gguf=("no_such_pkg_xyz", "m.gguf"))
    )
    with pytest.raises(ConfigError) as err:
        resolve_model("bundled-test")
    assert err.value.code == "CONFIG_UNKNOWN_MODEL" and "nobody/bundled-test-xyz" in err.value.message
