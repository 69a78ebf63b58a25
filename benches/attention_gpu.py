"""Speed of causal attention over rows of equal samples on CUDA: flash (`varlen_attn`) against cuDNN's kernel.

Qwen2.5-7B's heads (28 query, 4 key/value, dim 128), bf16, forward and backward: one sample
of 2k, 8k, 16k and 64k tokens (a long-context row holds one sample), and four samples of 2k
packed in one row (fixed-length chunks: the 4 x 2048 step of `train_gpu.py dense`). Those
are the rows training runs on cuDNN's kernel.
Each way is timed for forward plus backward with CUDA events and checked against the other
(largest difference of output and gradients, relative to the largest value):

  flash      `torch.nn.attention.varlen.varlen_attn` (what `attention._varlen` calls)
  cudnn      `cudnn_attention.attend` (SDPA's cuDNN backend, what training uses where
             `cudnn_attention.check` verified it)

  python benches/attention_gpu.py

One JSON line per case goes to stdout and to $OUT/attention.jsonl (or /tmp). TFLOP/s count the
causal half of the score matrix, forward (2 matmuls) and backward (5).
"""

from __future__ import annotations

import functools
import json
import os
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Qwen2Config

from backpropagate.train.torch import attention, cudnn_attention

OUT = Path(os.environ.get("OUT", "/tmp"))
HEADS, KV_HEADS, DIM = 28, 4, 128
# (samples in the row, tokens per sample)
CASES = ((1, 2048), (4, 2048), (1, 8192), (1, 16384), (1, 65536))


def ms_per_call(fn: Callable[[], None], repeats: int) -> float:
    """Milliseconds per call from CUDA events, after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end)) / repeats


def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    longest = int((cu[1:] - cu[:-1]).max())
    return attention._varlen(q, k, v, None, (cu, cu, longest, longest), None, None)


def cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    return cudnn_attention.attend(q, k, v, None, rows=len(cu) - 1)


def case(rows: int, tokens: int, generator: torch.Generator) -> dict[str, object]:
    """Both ways on `rows` samples of `tokens` in one row: time, TFLOP/s, and how far apart their results are.

    The inputs are laid out as a model's projections leave them ([1, T, heads, dim] seen as [1, heads, T, dim]).
    """
    total = rows * tokens
    cu = torch.arange(0, total + 1, tokens, dtype=torch.int32, device="cuda")
    q, k, v = (
        torch.randn(1, total, h, DIM, device="cuda", generator=generator, dtype=torch.bfloat16)
        .transpose(1, 2)
        .requires_grad_()
        for h in (HEADS, KV_HEADS, KV_HEADS)
    )
    grad = torch.randn(1, total, HEADS, DIM, device="cuda", generator=generator, dtype=torch.bfloat16)
    flops = 7 * rows * tokens * tokens * HEADS * DIM
    row: dict[str, object] = {"rows": rows, "tokens": tokens, "card": torch.cuda.get_device_name()}
    results = {}
    for way, fn in (("flash", flash), ("cudnn", cudnn)):
        forward = functools.partial(fn, q, k, v, cu)
        try:
            out = forward()
            results[way] = [out.float(), *(g.float() for g in torch.autograd.grad(out, (q, k, v), grad))]
            ms = ms_per_call(lambda f=forward: torch.autograd.backward(f(), grad), 2 if tokens > 20000 else 10)
            row[way] = {"ms": round(ms, 2), "tflops": round(flops / ms / 1e9, 1)}
        except Exception as exc:  # a way this torch lacks is reported, not fatal
            row[way] = f"{type(exc).__name__}: {str(exc)[:200]}"
    if len(results) == 2:
        pairs = zip(results["flash"], results["cudnn"], strict=True)
        row["largest_difference"] = max(float((a - b).abs().max() / b.abs().max()) for a, b in pairs)
        row["cudnn_speedup"] = round(row["flash"]["ms"] / row["cudnn"]["ms"], 2)  # type: ignore[index]
    return row


def main() -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    config = Qwen2Config(num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, hidden_size=HEADS * DIM)
    verified = cudnn_attention.check(types.SimpleNamespace(config=config), torch.device("cuda"), torch.bfloat16)
    for rows, tokens in CASES:
        row = case(rows, tokens, generator)
        row.update(cudnn_verified=verified, torch=torch.__version__, cudnn_version=torch.backends.cudnn.version())
        row["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        line = json.dumps(row)
        print(line, flush=True)
        with (OUT / "attention.jsonl").open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
