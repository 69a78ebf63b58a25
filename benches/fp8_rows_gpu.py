"""Speed of per-token FP8 quantization (`train/torch/fp8_rows.py`) against the compiled kernel, on CUDA.

Every FP8 product quantizes its input rows on the fly. This times both ways at 8,192 tokens
on the row widths of a Qwen2.5-7B and a Llama 3.1 8B layer (hidden sizes, key/value widths
and MLP widths: the inputs and the output gradients of the projections), checks the two
against each other, and reports each as ms and GB/s moved (2 bytes read and 1 written per
value), beside a bf16 copy of the rows at the same GB/s count, which bounds what one pass
can reach. The kernel is also timed at other warp counts, so `fp8_rows.warps_for` is checked
on the card at hand.

  python benches/fp8_rows_gpu.py

One JSON line per width and way goes to stdout and to $OUT/fp8_rows.jsonl (or /tmp).
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
import triton

sys.path.insert(0, str(Path(__file__).parent))
from fp8_transpose_gpu import seconds_per_call  # noqa: E402

from backpropagate.train.torch import fp8, fp8_rows  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp"))
TOKENS = 8192
WIDTHS = (512, 1024, 3584, 4096, 14336, 18944)
WARPS = (4, 8, 16)


def main() -> int:
    ways: dict[str, Callable[[torch.Tensor], object]] = {
        "bf16 copy (bound)": torch.clone,
        "compiled": fp8._compiled_rows,
        "module": fp8_rows.quantized_by_kernel,
    }
    ways.update({f"kernel warps {w}": functools.partial(fp8_rows.quantized_by_kernel, warps=w) for w in WARPS})
    card = torch.cuda.get_device_name()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "fp8_rows.jsonl", "a") as log:
        for width in WIDTHS:
            x = torch.randn(TOKENS, width, device="cuda", dtype=torch.bfloat16)
            want_q, want_scale = fp8.rows_in_fp8(x)
            for way, fn in ways.items():
                row: dict[str, object] = {"tokens": TOKENS, "width": width, "way": way}
                if way != "bf16 copy (bound)":
                    q, scale = fn(x)  # type: ignore[misc]
                    same = (q.view(torch.uint8) == want_q.view(torch.uint8)).float().mean()
                    row["same_bytes"] = round(float(same), 6)
                    row["same_scales"] = bool(torch.equal(scale, want_scale))
                seconds = seconds_per_call(fn, x)
                row.update(ms=round(seconds * 1e3, 4), gb_per_s=round(3 * x.numel() / seconds / 1e9, 1))
                row.update(card=card, module_warps=fp8_rows.warps_for(triton.next_power_of_2(width)), time=stamp)
                print(json.dumps(row), flush=True)
                log.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
