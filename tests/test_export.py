"""Exports from adapter folders: LoRA/DoRA merged on the fly into GGUF equal PEFT's own
merge, the three formats, model cards, overwrite rules, and atomicity under failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
RUN_RECORD = {
    "run_id": "run-2026-abc",
    "base_model": "tiny-llama",
    "method": "sft",
    "mode": "lora",
    "hyperparameters": {"lr": 0.0002, "r": 8, "steps": 60},
    "data_hash": "sha256:feedbeef",
    "final_loss": 1.2345,
    "losses": [[1, 3.5], [60, 1.2345]],
    "command": "backprop train --model tiny-llama --steps 60",
}


def make_adapter(base: Path, out: Path, base_name: str, **lora: object) -> Path:
    """A PEFT adapter with random (non-zero) factors on `base`, saved to `out`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    fields: dict = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False, **lora}
    cfg = LoraConfig(**fields)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(3.0)
    peft_model.save_pretrained(out)
    cfg_path = out / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = base_name
    cfg_path.write_text(json.dumps(data))
    return out


def peft_merged(base: Path, adapter: Path, out: Path) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data).copy() for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize(
    "variant",
    [{}, {"use_rslora": True}, {"use_dora": True}, {"modules_to_save": ["lm_head"]}],
    ids=["lora", "rslora", "dora", "modules_to_save"],
)
def test_on_the_fly_merge_equals_peft_merge(variant: dict, tiny_llama: Path, tmp_path: Path) -> None:
    from backpropagate import _core

    adapter = make_adapter(tiny_llama, tmp_path / "adapter", "tiny-llama", **variant)
    ours = tmp_path / "ours.gguf"
    _core.convert_to_gguf(str(tiny_llama), str(ours), "f32", adapter_dir=str(adapter))
    ref_dir = peft_merged(tiny_llama, adapter, tmp_path / "merged")
    ref = tmp_path / "ref.gguf"
    _core.convert_to_gguf(str(ref_dir), str(ref), "f32")
    a, b = tensors(ours), tensors(ref)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_gguf_export_from_adapter_generates_like_peft(tiny_qwen2: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backpropagate.export import export
    from backpropagate.generate import GGUFModel

    adapter = make_adapter(tiny_qwen2, tmp_path / "run" / "adapter", "tiny-qwen2", use_dora=True)
    result = export(adapter, "gguf", quantization="f32")
    assert result.path.suffix == ".gguf" and result.path.parent == tmp_path / "run" / "adapter-gguf"
    assert result.model_card.exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32), adapter)
    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    text = "Write a haiku about the sea."
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
    want = torch.topk(logp, 5)
    got = GGUFModel(result.path, n_ctx=256).top_logprobs(text, 5)
    # The base is near-uniform (std 0.02), so neighbours may swap within noise: same five
    # tokens, each with the probability transformers gives it.
    assert {t for t, _ in got} == set(want.indices.tolist())
    np.testing.assert_allclose([v for _, v in got], [logp[t].item() for t, _ in got], atol=1e-2)


def test_lora_and_merged_formats_with_model_card(tiny_llama: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from backpropagate.errors import StateError
    from backpropagate.export import export

    adapter = make_adapter(tiny_llama, tmp_path / "adapter", "tiny-llama")
    (adapter / "backpropagate_run.json").write_text(json.dumps({**RUN_RECORD, "loss_curve": "loss.png"}))
    (adapter / "loss.png").write_bytes(b"\x89PNG fake plot bytes")

    lora = export(adapter, "lora", output=tmp_path / "lora")
    names = {p.name for p in lora.files}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md", "loss.png"} <= names
    card = (tmp_path / "lora" / "README.md").read_text()
    for field in ("run-2026-abc", "tiny-llama", "sft", "sha256:feedbeef", "1.2345", "backprop train", "loss.png"):
        assert field in card

    merged = export(adapter, "merged", output=tmp_path / "merged")
    files = {p.name for p in merged.files}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= files
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert reloaded.dtype == torch.bfloat16
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16), adapter)
    ref = ref.merge_and_unload()
    for (n, p), (_, q) in zip(reloaded.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(p, q), n

    with pytest.raises(StateError) as err:
        export(adapter, "merged", output=tmp_path / "merged")
    assert err.value.code == "STATE_OUTPUT_EXISTS"
    again = export(adapter, "merged", output=tmp_path / "merged", force=True)
    assert again.path.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_card_says_what_is_unknown(tiny_llama: Path, tmp_path: Path) -> None:
    from backpropagate.export import export

    result = export(tiny_llama, "gguf", output=tmp_path / "out", quantization="bf16")
    card = result.model_card.read_text()
    assert "unknown (no run record)" in card and "bf16" in card


def test_existing_gguf_needs_force(tiny_llama: Path, tmp_path: Path) -> None:
    from backpropagate.errors import StateError
    from backpropagate.export import export

    target = tmp_path / "m.gguf"
    target.write_bytes(b"keep me")
    with pytest.raises(StateError):
        export(tiny_llama, "gguf", output=target, quantization="f16")
    assert target.read_bytes() == b"keep me"
    export(tiny_llama, "gguf", output=target, quantization="f16", force=True)
    assert target.read_bytes()[:4] == b"GGUF"


def test_failure_mid_stream_leaves_no_file(tiny_llama: Path, tmp_path: Path) -> None:
    """An adapter whose last layer does not fit fails after most tensors were written."""
    from safetensors.torch import load_file, save_file

    from backpropagate import _core
    from backpropagate.errors import InputError

    adapter = make_adapter(tiny_llama, tmp_path / "adapter", "tiny-llama")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in weights if "layers.1.mlp.up_proj.lora_A" in k)
    weights[key] = weights[key][:, :-1].contiguous()
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    out = tmp_path / "out" / "m.gguf"
    with pytest.raises(InputError) as err:
        _core.convert_to_gguf(str(tiny_llama), str(out), "f32", adapter_dir=str(adapter))
    assert err.value.code == "INPUT_ADAPTER_INVALID" and "layers.1.mlp.up_proj" in err.value.message
    assert list((tmp_path / "out").iterdir()) == []


def test_kill_mid_export_leaves_no_file(tmp_path: Path) -> None:
    """SIGKILL during a real export: the final name never appears; the next run cleans up."""
    from backpropagate.tiny import ensure_tiny_model
    from export_models import build_model

    model = build_model("qwen2", tmp_path / "big", hidden=1024, layers=8, tokenizer_dir=ensure_tiny_model("tiny-qwen2"))
    out = tmp_path / "out" / "big.gguf"
    out.parent.mkdir()
    code = f"import sys; from backpropagate import _core; _core.convert_to_gguf({str(model)!r}, {str(out)!r}, 'f16')"
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    temp: list[Path] = []
    while time.monotonic() < deadline and not temp and proc.poll() is None:
        temp = [p for p in out.parent.iterdir() if p.name.endswith(".tmp") and p.stat().st_size > 0]
        time.sleep(0.005)
    if not temp:
        proc.wait()
        pytest.skip("the export finished before it could be interrupted")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    from backpropagate import _core

    _core.convert_to_gguf(str(model), str(out), "f16")
    assert out.exists() and [p.name for p in out.parent.iterdir()] == [out.name]


def test_cli_export_then_generate(tiny_llama: Path, tmp_path: Path) -> None:
    from cli_helpers import run_cli

    out = tmp_path / "gguf"
    r = run_cli("export", str(tiny_llama), "--format", "gguf", "--quantization", "q8_0", "--output", str(out))
    assert r.status == 0, r.stderr
    assert "wrote" in r.stdout and "q8_0" in r.stdout
    gguf_file = next(out.glob("*.gguf"))
    g = run_cli("generate", str(gguf_file), "--prompt", "Hello there", "--max-tokens", "5")
    assert g.status == 0, g.stderr
    before = gguf_file.stat()
    again = run_cli("export", str(tiny_llama), "--format", "gguf", "--quantization", "q8_0", "--output", str(out))
    assert again.status == 0, again.stderr
    assert again.stdout.startswith("reused ")
    after = gguf_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # reused, not converted again
    other = run_cli("export", str(tiny_llama), "--format", "gguf", "--quantization", "f16", "--output", str(gguf_file))
    assert other.status == 6 and "[STATE_OUTPUT_EXISTS]" in other.stderr and "'q8_0', not 'f16'" in other.stderr
    bad = run_cli(
        "export", str(tiny_llama), "--format", "gguf", "--quantization", "q3_k", "--output", str(tmp_path / "x")
    )
    assert bad.status == 2 and "[CONFIG_INVALID_SETTING]" in bad.stderr and "q4_k_m" in bad.stderr


def test_adapter_tokenizer_and_template_win(tiny_llama: Path, tmp_path: Path) -> None:
    """A run that saved its own tokenizer files exports that chat template."""
    from backpropagate.export import export

    adapter = make_adapter(tiny_llama, tmp_path / "adapter", "tiny-llama")
    for name in ("tokenizer.json", "special_tokens_map.json"):
        (adapter / name).write_bytes((tiny_llama / name).read_bytes())
    config = json.loads((tiny_llama / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (adapter / "tokenizer_config.json").write_text(json.dumps(config))
    result = export(adapter, "gguf", quantization="f32")
    template = gguf.GGUFReader(result.path).fields["tokenizer.chat_template"].contents()
    assert template == config["chat_template"]
