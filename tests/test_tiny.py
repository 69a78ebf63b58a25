import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from backpropagate.tiny import TINY_MODELS, ensure_tiny_model


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_tiny_model_loads_and_generates(name, _isolated_home):
    path = ensure_tiny_model(name)
    assert ensure_tiny_model(name) == path  # created once, then reused
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == TINY_MODELS[name].arch
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 6 or int(out[0, -1]) == tok.eos_token_id
    assert tok.decode(tok("Hello, world!", add_special_tokens=False)["input_ids"]) == "Hello, world!"


def test_tiny_models_are_deterministic(tmp_path, monkeypatch, tiny_qwen2):
    monkeypatch.setenv("BACKPROPAGATE_HOME", str(tmp_path))
    again = ensure_tiny_model("tiny-qwen2")
    assert again != tiny_qwen2
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert (again / name).read_bytes() == (tiny_qwen2 / name).read_bytes()
