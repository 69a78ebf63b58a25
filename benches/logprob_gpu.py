"""Speed of the loss's log-probability row kernel (`train/torch/logprob_rows.py`) against the compiled and eager ways, on CUDA.

The loss walks the LM head in chunks of 832 positions of Qwen2.5's 152,064-token vocabulary
(bf16 logits) and needs each chunk's log-probabilities and their gradient. This times the
kernel, the compiled `losses._logprob_and_grad` (what CUDA ran before it) and the same
function eager on one such chunk, and the log-probabilities alone (the frozen-head forward
of a preference reference) by the kernel and compiled. Each is reported as ms per call and
GB/s of the fewest bytes it must move (the logits read twice and the gradient written once;
the logits read once for log-probabilities alone), with its largest difference from the eager
result. The kernel is also timed at other block sizes and warp counts, so the module's choice
(BLOCK, WARPS) is checked on the card at hand.

  python benches/logprob_gpu.py

One JSON line per way goes to stdout and to $OUT/results.jsonl (or /tmp).
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

from backpropagate.train.torch import fused, logprob_rows, losses  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp"))
ROWS, VOCAB = 832, 152064
BLOCKS = (2048, 4096, 8192, 16384)
WARPS = (4, 8, 16)


def main() -> int:
    both: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
        "module": logprob_rows.logprob_and_grad_by_kernel,
        "compiled": fused.kernel("logprob_and_grad").plain,
        "eager": losses._logprob_and_grad,
    }
    both.update(
        {
            f"kernel block {b} warps {w}": functools.partial(logprob_rows.logprob_and_grad_by_kernel, block=b, warps=w)
            for b in BLOCKS
            for w in WARPS
        }
    )
    only: dict[str, Callable[..., torch.Tensor]] = {
        "logprob only module": logprob_rows.logprob_only_by_kernel,
        "logprob only compiled": fused.kernel("logprob_only").plain,
    }
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (4 * torch.randn(ROWS, VOCAB, generator=g, device="cuda")).to(torch.bfloat16)
    targets = torch.randint(0, VOCAB, (ROWS,), generator=g, device="cuda")
    want_logp, want_grad = losses._logprob_and_grad(logits, targets)
    card = torch.cuda.get_device_name()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    size = logits.numel() * logits.element_size()
    OUT.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    for way, fn in both.items():
        logp, grad = fn(logits, targets)
        seconds = seconds_per_call(functools.partial(fn, targets=targets), logits)
        rows.append(
            {
                "way": way,
                "ms": round(seconds * 1e3, 4),
                "gb_per_s": round(3 * size / seconds / 1e9, 1),
                "logp_max_abs_diff": float((logp - want_logp).abs().max()),
                "grad_max_abs_diff": float((grad.float() - want_grad.float()).abs().max()),
            }
        )
    for way, alone in only.items():
        logp = alone(logits, targets)
        seconds = seconds_per_call(functools.partial(alone, targets=targets), logits)
        rows.append(
            {
                "way": way,
                "ms": round(seconds * 1e3, 4),
                "gb_per_s": round(size / seconds / 1e9, 1),
                "logp_max_abs_diff": float((logp - want_logp).abs().max()),
            }
        )
    with open(OUT / "results.jsonl", "a") as log:
        for row in rows:
            row.update(
                rows=ROWS, vocab=VOCAB, card=card, block=logprob_rows.BLOCK, warps=logprob_rows.WARPS, time=stamp
            )
            print(json.dumps(row), flush=True)
            log.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
