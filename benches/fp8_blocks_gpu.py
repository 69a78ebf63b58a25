"""What activation scales per block of 128 would cost `--fp8` on CUDA, against the per-token scales it uses.

`fp8_quality.py --scales` finds that scaling each token's activations per block of 128 values,
not per row, takes a quarter to a third off FP8's loss gap on SmolLM2. `torch._scaled_mm`
takes such scales (1 x 128 for the input, 128 x 128 for the weight, which here repeat the
weight's one tensor scale) where cuBLAS has block-scaled FP8 kernels (Hopper, CUDA 12.9+).
This times, at 8,192 tokens on a Qwen2.5-7B layer's products, forward and input gradient:

  - bf16 `torch.mm`;
  - FP8 with per-token scales, as `fp8.scaled_mm` runs it;
  - FP8 with 1 x 128 scales, in each scale layout the build might ask for (it says which one
    it took, or why none);
  - quantizing the input: `fp8.quantize_rows` against a compiled per-block quantizer;

and reports each product's error against the exact product of the same e4m3 values.

  python benches/fp8_blocks_gpu.py

One JSON line per product and way goes to stdout and to $OUT/fp8_blocks.jsonl (or /tmp).
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
from fp8_quality import blocks_in_fp8, dequantized  # noqa: E402
from fp8_transpose_gpu import seconds_per_call  # noqa: E402

from backpropagate.train.torch import fp8  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp"))
TOKENS = 8192
BLOCK = 128
# (name, out, in) of a Qwen2.5-7B layer's products; the input gradient swaps out and in.
PRODUCTS = (("q, o", 3584, 3584), ("gate, up", 18944, 3584), ("down", 3584, 18944))


def input_scales(scale: torch.Tensor) -> torch.Tensor:
    """The [n, k / 128] scales laid out as cuBLAS reads them: n contiguous."""
    return scale.t().contiguous().t()


def weight_scales(layouts: str, n: int, k: int, value: torch.Tensor) -> torch.Tensor:
    """The weight's 128 x 128 scales for `torch._scaled_mm(x, W^T)`, W [n, k], every block `value`.

    `rows` lays the [n / 128, k / 128] scales out row-major; `padded` pads each row to a
    multiple of 4, which some builds ask for.
    """
    rows, cols = n // BLOCK, k // BLOCK
    stride = cols if layouts == "rows" else -(-cols // 4) * 4
    full = value.reshape(1, 1).expand(rows, stride).contiguous()
    return full[:, :cols].t()


def exact(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """The product of the e4m3 values, scaled per block, in fp32."""
    return dequantized(x_q, x_scale, BLOCK) @ (w_q.float() * w_scale).t()


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


def main() -> int:
    card = torch.cuda.get_device_name()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    OUT.mkdir(parents=True, exist_ok=True)
    blocks = torch.compile(functools.partial(blocks_in_fp8, block=BLOCK))
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
    tensor_scale = weight.out_scale[0, :1]
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
            q, weight.data.t(), scale_a=x_row_scale, scale_b=weight.out_scale, out_dtype=torch.bfloat16
        )

    want = (x_rows.float() * x_row_scale) @ (weight.data.float() * tensor_scale).t()
    timed("fp8 per token", by_rows, x_rows, error=round(error(by_rows(x_rows), want), 5))
    x_blocks, x_block_scale = blocks(x)
    want = exact(x_blocks, x_block_scale, weight.data, tensor_scale)
    scale_a = input_scales(x_block_scale)
    for layout in ("rows", "padded"):
        scale_b = weight_scales(layout, n, k, tensor_scale)

        def by_blocks(q: torch.Tensor, sb: torch.Tensor = scale_b) -> torch.Tensor:
            return torch._scaled_mm(q, weight.data.t(), scale_a=scale_a, scale_b=sb, out_dtype=torch.bfloat16)

        way = f"fp8 1 x 128, scales {layout}"
        try:
            got = by_blocks(x_blocks)
        except (RuntimeError, NotImplementedError) as failed:
            rows.append({"way": way, "failed": str(failed).splitlines()[0][:300]})
            continue
        timed(way, by_blocks, x_blocks, error=round(error(got, want), 5))
        break
    timed("quantize per token", fp8.quantize_rows, x)
    timed("quantize per 1 x 128 (compiled)", blocks, x)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
