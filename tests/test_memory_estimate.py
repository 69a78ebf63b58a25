"""`estimate_memory` / `backprop estimate-memory`: structure of the prediction, and its saved-input term measured."""

import json

import numpy as np
import pytest
import torch

from backpropagate.errors import ConfigError, InputError
from backpropagate.memory_estimate import estimate_memory
from cli_helpers import run_cli

# Llama 3.1 8B's shape (config.json fields), as the max-context bench builds it.
LLAMA_8B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
)


def test_peak_grows_with_length_and_orders_the_modes():
    peaks = [estimate_memory(LLAMA_8B, n, mode="qlora", lora_r=32).peak_bytes for n in (1024, 8192, 65536, 262144)]
    assert peaks == sorted(peaks) and len(set(peaks)) == 4
    by_mode = [estimate_memory(LLAMA_8B, 8192, mode=m, lora_r=32).peak_bytes for m in ("qlora", "lora", "full")]
    assert by_mode[0] < by_mode[1] < by_mode[2]
    # nf4 codes plus block scales: about 4.5 GiB for the 8B decoder's linear layers, plus 2 GiB of embeddings and head.
    assert 5.0 < estimate_memory(LLAMA_8B, 1024, lora_r=32).parts["weights"] / 2**30 < 7.0


# Peaks measured on an H100 (2026-12-06): Llama 3.1 8B shape, rank 32 on every linear layer, one
# row, every layer recomputed. (mode, offload, tokens) -> GiB allocated. QLoRA with offload from
# benches/max_context_gpu.py (results/max_context_h100.jsonl), the 24,576-token ones from
# benches/memory_estimate_gpu.py (results/memory_estimate_h100.jsonl).
MEASURED_PEAKS_GIB = {
    ("qlora", True, 31232): 10.92,
    ("qlora", True, 38912): 11.48,
    ("qlora", True, 83200): 15.56,
    ("qlora", True, 24576): 10.43,
    ("qlora", False, 24576): 15.76,
    ("lora", True, 24576): 19.37,
    ("lora", False, 24576): 24.71,
}


@pytest.mark.parametrize(("setting", "measured"), MEASURED_PEAKS_GIB.items(), ids=str)
def test_the_estimate_is_within_ten_percent_of_the_measured_peaks(setting, measured):
    """Less its allocator margin, the estimate is 2-5% above what the runs allocated: never below it."""
    mode, offload, tokens = setting
    estimate = estimate_memory(LLAMA_8B, tokens, mode=mode, lora_r=32, offload=offload)
    predicted = (estimate.peak_bytes - estimate.parts["margin"]) / 2**30
    assert measured < predicted < 1.1 * measured


# Qwen2.5-7B's shape as benches/train_gpu.py builds it: LoRA r16 on every linear layer, 4 rows
# of 2,048 tokens, every layer recomputed (flash attention per row holds what one 8,192-token
# row holds). H100, 2026-12-06, results/train_gpu_h100.jsonl: `dense` and `fp8`.
QWEN_7B = dict(
    hidden_size=3584,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    intermediate_size=18944,
    vocab_size=152064,
)


@pytest.mark.parametrize(("fp8", "measured"), [(False, 18.02), (True, 11.95)], ids=["bf16", "fp8"])
def test_fp8_weights_take_half_and_the_estimate_follows_the_measured_peak(fp8, measured):
    estimate = estimate_memory(QWEN_7B, 8192, mode="lora", lora_r=16, offload=False, fp8=fp8)
    predicted = (estimate.peak_bytes - estimate.parts["margin"]) / 2**30
    assert measured < predicted < 1.1 * measured
    bf16 = estimate_memory(QWEN_7B, 8192, mode="lora", lora_r=16, offload=False)
    linear_bytes = (
        28 * sum(i * o for i, o in ((3584, 3584), (3584, 512), (3584, 512), (3584, 3584))) + 28 * 3 * 3584 * 18944
    )
    assert bf16.parts["weights"] - estimate.parts["weights"] == (linear_bytes if fp8 else 0)
    assert estimate.fp8 is fp8 and ("fp8_transposed" in estimate.parts) is fp8
    assert estimate.max_context[24] >= bf16.max_context[24]


def test_fp8_is_refused_outside_lora():
    with pytest.raises(ConfigError) as err:
        estimate_memory(QWEN_7B, 8192, mode="qlora", fp8=True)
    assert err.value.code == "CONFIG_INVALID_SETTING" and "mode='qlora'" in err.value.message


def test_the_peak_is_the_largest_phase_not_their_sum():
    """Short rows peak in the loss (a chunk of logits), long ones in a layer's backward."""
    short = estimate_memory(LLAMA_8B, 2048, mode="qlora", lora_r=32)
    mid = estimate_memory(LLAMA_8B, 16384, mode="qlora", lora_r=32, offload=True)
    long = estimate_memory(LLAMA_8B, 131072, mode="qlora", lora_r=32, offload=True)
    phases = ("attention_backward", "mlp_backward", "loss")
    assert [[p for p in phases if p in e.parts] for e in (short, mid, long)] == [
        ["loss"],
        ["mlp_backward"],
        ["attention_backward"],
    ]


def test_offload_moves_saved_inputs_to_the_host_and_lengthens_the_context():
    kept = estimate_memory(LLAMA_8B, 131072, lora_r=32, offload=False)
    moved = estimate_memory(LLAMA_8B, 131072, lora_r=32, offload=True)
    assert kept.host_bytes == 0 and moved.host_bytes == 31 * 4096 * 2 * 131072
    assert kept.peak_bytes - moved.peak_bytes > 0.9 * 30 * 4096 * 2 * 131072
    # `card_gib` turns offload on only where the step would not fit otherwise.
    assert not estimate_memory(LLAMA_8B, 8192, lora_r=32, card_gib=16).offload
    assert estimate_memory(LLAMA_8B, 262144, lora_r=32, card_gib=80).offload
    contexts = estimate_memory(LLAMA_8B, 4096, lora_r=32, card_gib=40).max_context
    assert list(contexts) == [16, 24, 40, 48, 80]
    assert list(contexts.values()) == sorted(contexts.values()) and contexts[16] > 8192
    fitted = estimate_memory(LLAMA_8B, contexts[24], lora_r=32, card_gib=24)
    too_long = estimate_memory(LLAMA_8B, contexts[24] + 1, lora_r=32, offload=True)
    assert fitted.peak_bytes <= 24 * 2**30 < too_long.peak_bytes


def test_host_memory_bounds_the_longest_context():
    """Offloaded inputs wait in host memory: a machine with less of it trains shorter contexts.

    Backward replays the inputs the host cannot take (the card keeping as many as a segment
    of replayed layers holds), so the bound lies beyond the length at which every layer's
    input but one fills the host.
    """
    host = 32 * 2**30
    unbounded = estimate_memory(LLAMA_8B, 4096, lora_r=32).max_context
    bounded = estimate_memory(LLAMA_8B, 4096, lora_r=32, host_gib=32).max_context
    assert bounded[80] < unbounded[80]
    all_but_one = host // (31 * 4096 * 2)
    assert bounded[80] > 1.5 * all_but_one
    at_limit = estimate_memory(LLAMA_8B, bounded[80], lora_r=32, card_gib=80, host_gib=32)
    assert at_limit.host_bytes <= host and at_limit.peak_bytes <= 80 * 2**30
    assert 0 < at_limit.offloaded_layers < 31 and at_limit.offloaded_layers + at_limit.replayed_layers < 32
    assert at_limit.replayed_layers > 0  # a segment of replayed inputs holds fewer on the card than keeping them
    beyond = estimate_memory(LLAMA_8B, bounded[80] + 1, lora_r=32, card_gib=80, host_gib=32)
    assert beyond.host_bytes <= host and beyond.peak_bytes > 80 * 2**30
    # With no room on the host, a card trains what fits it without offload.
    no_room = estimate_memory(LLAMA_8B, 4096, lora_r=32, host_gib=0.001).max_context[16]
    assert no_room == estimate_memory(LLAMA_8B, 4096, lora_r=32, offload=False).max_context[16] > 8192
    with pytest.raises(ConfigError, match="host_gib=0"):
        estimate_memory(LLAMA_8B, 512, host_gib=0)


def test_offload_that_would_not_fit_the_host_is_named_before_it_runs():
    import torch

    from backpropagate.memory_estimate import host_shortfall

    needed = 31 * 4096 * 2 * 262144  # 62 GiB of layer inputs
    assert host_shortfall(LLAMA_8B, 262144, torch.bfloat16, needed) is None
    assert host_shortfall(LLAMA_8B, 262144, torch.bfloat16, None) is None  # unknown: nothing to say
    message = host_shortfall(LLAMA_8B, 262144, torch.bfloat16, 32 * 2**30)
    assert message is not None and "62.0 GiB of host memory at 262144 tokens" in message and "--host-gib" in message


def test_host_term_matches_what_offload_moves(tiny_llama):
    """The offloaded layer inputs of a real recomputed forward and backward: the estimate's host term, to the byte."""
    from transformers import AutoModelForCausalLM

    from backpropagate.train.torch.recompute import RecomputePlan

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    plan = RecomputePlan(model, "on", "on")
    model.train()
    tokens = 300
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, model.config.vocab_size, (1, tokens)))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert plan.offload is not None and plan.offload.offloaded == model.config.num_hidden_layers - 1
    predicted = estimate_memory(tiny_llama, tokens, mode="lora", offload=True, dtype_bytes=4)
    assert predicted.host_bytes == plan.offload.host_bytes > 0


def test_reads_a_preset_or_folder_and_refuses_bad_input(tiny_llama, tmp_path):
    import backpropagate

    assert backpropagate.estimate_memory("tiny-llama", 512, mode="lora").parts["weights"] > 0
    assert estimate_memory(tiny_llama / "config.json", 512).tokens == 512
    with pytest.raises(ConfigError, match="mode='int4'"):
        estimate_memory(LLAMA_8B, 512, mode="int4")
    with pytest.raises(ConfigError, match="max_seq_length=0"):
        estimate_memory(LLAMA_8B, 0)
    broken = tmp_path / "config.json"
    broken.write_text('{"hidden_size": 64}')
    with pytest.raises(InputError, match="lacks the decoder's sizes"):
        estimate_memory(broken, 512)


def test_cli_prints_parts_and_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    shown = run_cli("estimate-memory", "--model", str(tmp_path), "--max-seq-length", "32768", "--lora-r", "32")
    assert shown.status == 0 and "peak" in shown.stdout and "longest context: 16 GiB" in shown.stdout
    as_json = run_cli(
        "estimate-memory", "--model", str(tmp_path), "--max-seq-length", "32768", "--card-gib", "24", "--json"
    )
    data = json.loads(as_json.stdout)
    assert data["ok"] and data["peak_bytes"] == sum(data["parts"].values()) and "24" in data["max_context"]
    host = run_cli("estimate-memory", "--model", str(tmp_path), "--max-seq-length", "32768", "--host-gib", "16")
    assert host.status == 0 and host.stdout != shown.stdout
    # 1 GiB of host holds four layers' inputs of 256 MiB (32768 x 4096 x 2 bytes): in segments of up to 7 (the card
    # keeping the last 7 inputs, as a segment holds), 4 of the other 25 go there and backward replays 21 (8 inputs
    # on the card at most, where keeping them would hold 29).
    args = ("--max-seq-length", "32768", "--card-gib", "16", "--host-gib", "1")
    small_host = run_cli("estimate-memory", "--model", str(tmp_path), *args)
    assert (
        "host (pinned)" in small_host.stdout
        and "1.00 GiB (inputs of 4 layers; 21 more replayed in backward)" in small_host.stdout
    )
    fp8 = run_cli("estimate-memory", "--model", str(tmp_path), "--max-seq-length", "32768", "--mode", "lora", "--fp8")
    assert fp8.status == 0 and "lora fp8" in fp8.stdout and "fp8_transposed" in fp8.stdout
    refused = run_cli("estimate-memory", "--model", str(tmp_path / "nope"), "--max-seq-length", "8", "--json")
    assert refused.status == 2 and json.loads(refused.stdout)["error"]["code"] == "CONFIG_UNKNOWN_MODEL"
    bad_mode = run_cli("estimate-memory", "--model", str(tmp_path), "--max-seq-length", "8", "--mode", "x")
    assert bad_mode.status == 2 and "[CONFIG_INVALID_SETTING]" in bad_mode.stderr
