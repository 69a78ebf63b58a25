"""Speed of the FP8 weight transpose (`train/torch/byte_transpose.py`) against PyTorch's copy, on CUDA.

An FP8 LoRA step transposes every adapted layer's e4m3 weight once, for the input-gradient
product. This times both ways on the projection shapes of a Qwen2.5-7B layer and reports each
as GB/s moved (bytes read plus bytes written), beside a plain device-to-device copy of the
same bytes, which bounds what any transpose can reach. The kernel is also timed at other tile
sizes and warp counts, so the module's choice (TILE, WARPS) is checked on the card at hand.

  python benches/fp8_transpose_gpu.py

One JSON line per shape and way goes to stdout and to $OUT/fp8_transpose.jsonl (or /tmp).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from backpropagate.train.torch import byte_transpose

OUT = Path(os.environ.get("OUT", "/tmp"))
# Qwen2.5-7B: q/o, k/v, gate/up, down ([out, in] of nn.Linear).
SHAPES = ((3584, 3584), (512, 3584), (18944, 3584), (3584, 18944))
TILES = (32, 64, 128)
WARPS = (4, 8)


def kernel(tile: int, warps: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's kernel launched at another tile size and warp count."""
    return functools.partial(byte_transpose.transposed_by_kernel, tile=tile, warps=warps)


def seconds_per_call(fn: Callable[[torch.Tensor], object], x: torch.Tensor, repeats: int = 50) -> float:
    """Seconds per call of `fn(x)`, from CUDA events over `repeats` calls after a warm-up."""
    for _ in range(3):
        fn(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn(x)
    end.record()
    torch.cuda.synchronize()
    return float(start.elapsed_time(end)) / 1e3 / repeats


def gb_per_s(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    """Bytes read and written per second."""
    return 2 * x.numel() / seconds_per_call(fn, x) / 1e9


def main() -> int:
    ways: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "copy (bound)": torch.clone,
        "torch strided copy": byte_transpose.strided_copy,
        "module": byte_transpose.transposed_by_kernel,
    }
    ways.update({f"kernel tile {t} warps {w}": kernel(t, w) for t in TILES for w in WARPS})
    card = torch.cuda.get_device_name()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "fp8_transpose.jsonl", "a") as log:
        for shape in SHAPES:
            x = torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
            for way, fn in ways.items():
                if way != "copy (bound)":
                    assert torch.equal(fn(x).view(torch.uint8), x.view(torch.uint8).t()), way
                row = {"shape": list(shape), "way": way, "gb_per_s": round(gb_per_s(fn, x), 1)}
                row.update(card=card, module_tile=byte_transpose.TILE, module_warps=byte_transpose.WARPS, time=stamp)
                print(json.dumps(row), flush=True)
                log.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
