"""Speed of a LoRA layer's two output-gradient products (`train/torch/lora_grads.py`) against two matmuls, on CUDA.

Backward of a LoRA layer needs dy (s B) and dy^T (x A^T); cuBLAS reads dy [tokens, out] once
for each. This times the kernel that reads it once against the two matmuls at 8,192 tokens on
a Qwen2.5-7B layer's output widths, rank 16 (and the stacked q/k/v product, whose rank-16
column of a 48-wide tensor the kernel reads in place), checks the results against each other,
and reports ms and GB/s counting one read of dy.

  python benches/lora_grads_gpu.py

One JSON line per width and way goes to stdout and to $OUT/lora_grads.jsonl (or /tmp).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from fp8_transpose_gpu import seconds_per_call  # noqa: E402

from backpropagate.train.torch import lora_fused, lora_grads  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp"))
TOKENS = 8192
# (output width, rank, width of the tensor the rank-r product is a column slice of)
CASES = ((18944, 16, 32), (3584, 16, 16), (3584, 16, 48), (512, 16, 48))


def _call(fn: Callable[..., object], dy: torch.Tensor, b: torch.Tensor, low: torch.Tensor) -> object:
    return fn(dy, b, low)


def main() -> int:
    card = torch.cuda.get_device_name()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "lora_grads.jsonl", "a") as log:
        for width, rank, stacked in CASES:
            dy = torch.randn(TOKENS, width, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(width, rank, device="cuda", dtype=torch.bfloat16) * 0.05
            low = torch.randn(TOKENS, stacked, device="cuda", dtype=torch.bfloat16)[:, :rank]
            want = lora_fused._two_products(dy, b, low)
            got = lora_grads.grads_by_kernel(dy, b, low)
            diffs = [
                float((g.float() - w.float()).abs().max() / w.float().abs().max())
                for g, w in zip(got, want, strict=True)
            ]
            ways = {"two matmuls": lora_fused._two_products, "kernel": lora_grads.grads_by_kernel}
            for way, fn in ways.items():
                seconds = seconds_per_call(functools.partial(_call, fn, b=b, low=low), dy)
                row = {"tokens": TOKENS, "width": width, "rank": rank, "stacked": stacked, "way": way}
                row.update(ms=round(seconds * 1e3, 4), gb_per_s=round(2 * dy.numel() / seconds / 1e9, 1))
                row.update(relative_max_diff=[round(d, 5) for d in diffs], card=card, time=stamp)
                print(json.dumps(row), flush=True)
                log.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
