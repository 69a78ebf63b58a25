"""What activation scales per block of 128 cost `--fp8` on CUDA, against per-token scales.

`fp8_quality.py --scales` finds that scaling each token's activations per block of 128 values,
not per row, takes a quarter to a third off FP8's loss gap on SmolLM2, so `--fp8` uses such
scales where cuBLAS has block-scaled FP8 kernels (Hopper, CUDA 12.9+): 1 x 128 for the input,
128 x 128 for the weight, which repeat the weight's one tensor scale. This times, at 8,192
tokens on a Qwen2.5-7B layer's products, forward and input gradient:

  - bf16 `torch.mm`;
  - FP8 with per-token scales;
  - FP8 with 1 x 128 scales, in the layout `fp8`'s probe found for this card (or none);
  - quantizing the input: per token (`fp8.quantize_rows`), per block by `fp8_rows`' kernel
    (`fp8.quantize_blocks`), and per block compiled (the kernel's fallback);

and reports each product's error against the exact product of the same e4m3 values.

  python benches/fp8_blocks_gpu.py

One JSON line per product and way goes to stdout and to $OUT/fp8_blocks.jsonl (or /tmp).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from fp8_transpose_gpu import seconds_per_call  # noqa: E402

from backpropagate.train.torch import fp8  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp"))
TOKENS = 8192
# (name, out, in) of a Qwen2.5-7B layer's products; the input gradient swaps out and in.
PRODUCTS = (("q, o", 3584, 3584), ("gate, up", 18944, 3584), ("down", 3584, 18944))


def exact(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """The product of the e4m3 values, scaled per token or block, in fp32."""
    return fp8.dequantized(x_q, x_scale) @ (w_q.float() * w_scale).t()


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


def main() -> int:
    card = torch.cuda.get_device_name()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    OUT.mkdir(parents=True, exist_ok=True)
    blocks = torch.compile(fp8.blocks_in_fp8)
    with open(OUT / "fp8_blocks.jsonl", "a") as log:
        for name, out_features, in_features in PRODUCTS:
            for direction, n, k in (
                ("forward", out_features, in_features),
                ("input gradient", in_features, out_features),
            ):
                base = {"product": name, "direction": direction, "tokens": TOKENS, "n": n, "k": k}
                for row in product_rows(n, k, blocks):
                    row = {
                        **base,
                        **row,
                        "card": card,
                        "torch": torch.__version__,
                        "cuda": torch.version.cuda,
                        "time": stamp,
                    }
                    print(json.dumps(row), flush=True)
                    log.write(json.dumps(row) + "\n")
    return 0


def product_rows(n: int, k: int, blocks: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> list[dict]:
    """Timings and errors of x [tokens, k] times W^T, W [n, k], each way."""
    x = torch.randn(TOKENS, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    weight = fp8.Fp8Weight.of(w)
    tensor_scale = weight.scale
    rows: list[dict] = []

    def timed(way: str, fn: Callable[[torch.Tensor], object], arg: torch.Tensor, **extra: object) -> None:
        seconds = seconds_per_call(fn, arg)
        rows.append(
            {
                "way": way,
                "ms": round(seconds * 1e3, 4),
                "tflops": round(2 * TOKENS * n * k / seconds / 1e12, 1),
                **extra,
            }
        )

    timed("bf16 mm", lambda a: torch.mm(a, w.t()), x)
    x_rows, x_row_scale = fp8.quantize_rows(x)

    def by_rows(q: torch.Tensor) -> torch.Tensor:
        return torch._scaled_mm(
            q, weight.data.t(), scale_a=x_row_scale, scale_b=weight.forward_scales.tokens, out_dtype=torch.bfloat16
        )

    want = exact(x_rows, x_row_scale, weight.data, tensor_scale)
    timed("fp8 per token", by_rows, x_rows, error=round(error(by_rows(x_rows), want), 5))
    x_blocks, scale_a = fp8.quantize_blocks(x)
    plain_blocks, plain_scale = fp8.blocks_in_fp8(x)
    differing = (x_blocks.view(torch.uint8) != plain_blocks.view(torch.uint8)).float().mean()
    rows.append(
        {
            "way": "block kernel against plain operations",
            "same_scales": torch.equal(scale_a, plain_scale),
            "bytes_differing": float(differing),
        }
    )
    want = exact(x_blocks, scale_a, weight.data, tensor_scale)
    scale_b = weight.forward_scales.blocks
    if scale_b is None:
        rows.append({"way": "fp8 1 x 128", "failed": "no block-scaled products on this card (the probe warned why)"})
    else:

        def by_blocks(q: torch.Tensor) -> torch.Tensor:
            return torch._scaled_mm(q, weight.data.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)

        way = f"fp8 1 x 128, {fp8.layout_on(x.device).blocks}"
        timed(way, by_blocks, x_blocks, error=round(error(by_blocks(x_blocks), want), 5))
    timed("quantize per token", fp8.quantize_rows, x)
    timed("quantize per 1 x 128 (kernel)", fp8.quantize_blocks, x)
    timed("quantize per 1 x 128 (compiled)", blocks, x)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
