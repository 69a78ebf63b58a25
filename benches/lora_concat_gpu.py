"""Speed of the wide LoRA layout (`train/torch/lora_concat.py`) against the rank-r part plus accumulating base matmul, on CUDA.

At 8,192 tokens on a Qwen2.5-7B layer's gate and up projections (3,584 in, 2 x 18,944 out,
rank 16 each), this times the forward products three ways: `lora_fused`'s (each output's
rank-r part written first, the base matmul accumulating onto it), the wide layout's (one
matmul per output over [x | x A^T], the base weight stored beside s B), and the base matmuls
alone (the floor). It checks that the two LoRA ways agree and reports ms per call.

  python benches/lora_concat_gpu.py

One JSON line per way goes to stdout and to $OUT/lora_concat.jsonl (or /tmp).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from fp8_transpose_gpu import seconds_per_call  # noqa: E402

from backpropagate.train.torch import lora_concat, lora_fused  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp"))
TOKENS, IN, OUTS, RANK = 8192, 3584, (18944, 18944), 16


def main() -> int:
    card = torch.cuda.get_device_name()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    torch.manual_seed(0)
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    x = torch.randn(TOKENS, IN, **bf16)
    weights = [torch.randn(n, IN, **bf16) * IN**-0.5 for n in OUTS]
    scaled = [torch.randn(n, RANK, **bf16) * 0.05 for n in OUTS]
    stacked = torch.randn(RANK * len(OUTS), IN, **bf16) * IN**-0.5
    low = x @ stacked.t()
    lows = low.split(RANK, dim=1)
    members = [lora_fused.Member(SimpleNamespace(), SimpleNamespace(bias=None), 1.0) for _ in OUTS]  # type: ignore[arg-type]
    wide = lora_concat.Wide.around(weights, [RANK] * len(OUTS))
    wide.load(scaled)

    def rank_part_first(_: torch.Tensor) -> list[torch.Tensor]:
        return [
            lora_fused._project(x, lo, b, m, None, w)
            for lo, b, m, w in zip(lows, scaled, members, weights, strict=True)
        ]

    def one_matmul(_: torch.Tensor) -> list[torch.Tensor]:
        return wide.project(x, low, [None] * len(OUTS))

    def base_only(_: torch.Tensor) -> list[torch.Tensor]:
        return [torch.mm(x, w.t()) for w in weights]

    want, got = rank_part_first(x), one_matmul(x)
    diff = max(
        float((g.float() - w.float()).abs().max() / w.float().abs().max()) for g, w in zip(got, want, strict=True)
    )
    ways: dict[str, Any] = {"rank part, then accumulate": rank_part_first, "wide": one_matmul, "base only": base_only}
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "lora_concat.jsonl", "a") as log:
        for way, fn in ways.items():
            row = {"tokens": TOKENS, "in": IN, "outs": list(OUTS), "rank": RANK, "way": way}
            row.update(
                ms=round(seconds_per_call(fn, x) * 1e3, 4), relative_max_diff=round(diff, 5), card=card, time=stamp
            )
            print(json.dumps(row), flush=True)
            log.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
