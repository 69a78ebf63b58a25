"""Where a GPU training step spends its time: a kernel profile of a bench variant, summarized.

`train_gpu.py --profile` runs each variant under `torch.profiler` and calls `summarize` on
the trace it writes. The summary answers the two questions a tokens/s gap raises:

* is the GPU idle (host-bound launches, syncs, allocator work)? `busy` is the share of each
  tenth of the run that some kernel covers; the last tenths are steady state, the first ones
  compilation and CUDA-graph capture;
* if busy, on what? device time per kind of kernel (bf16 and FP8 matmuls, attention, our
  Triton kernels, PyTorch's elementwise kernels, copies) and the heaviest kernels by name.

* which operators, on which shapes, launch the copies and elementwise kernels.

  python benches/gpu_profile.py trace.json.gz       # summarize a trace written earlier
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Kernel kinds, first match wins: (kind, pattern on the kernel's name).
KINDS = [
    ("matmul_fp8", re.compile(r"e4m3|fp8|f8f8", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|cublas|sm90_xmma|ampere_.*_s\d+", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|flex", re.I)),
    ("triton", re.compile(r"^triton_")),
    ("copy", re.compile(r"memcpy|memset|copy", re.I)),
    ("reduction", re.compile(r"reduce|norm|softmax|cross_entropy|nll", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled", re.I)),
]


def kind_of(name: str) -> str:
    """The kind of a kernel, by its name (see KINDS); "other" where none matches."""
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


@contextmanager
def profiled(trace: Path) -> Iterator[None]:
    """Profiles CPU and CUDA activity for the duration and writes a gzipped Chrome trace to `trace`."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        yield
    plain = trace.with_suffix("")
    prof.export_chrome_trace(str(plain))
    with open(plain, "rb") as src, gzip.open(trace, "wb", compresslevel=6) as dst:
        dst.write(src.read())
    plain.unlink()


def _events(trace: Path) -> list[dict[str, Any]]:
    with gzip.open(trace, "rt") as f:
        events: list[dict[str, Any]] = json.load(f)["traceEvents"]
    return events


def _kernels(events: list[dict[str, Any]]) -> list[tuple[float, float, str]]:
    return sorted(
        (float(e["ts"]), float(e["dur"]), e["name"])
        for e in events
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    )


def _busy_share(kernels: list[tuple[float, float, str]], start: float, end: float) -> float:
    """The share of [start, end) that at least one kernel covers (kernels sorted by start)."""
    covered, reach = 0.0, start
    for ts, dur, _ in kernels:
        lo, hi = max(ts, reach), min(ts + dur, end)
        if hi > lo:
            covered += hi - lo
            reach = hi
        if ts >= end:
            break
    return covered / max(end - start, 1e-9)


def launch_sites(
    events: list[dict[str, Any]], kinds: tuple[str, ...] = ("copy", "elementwise"), top: int = 20
) -> list[dict[str, Any]]:
    """Device time of the kernels of `kinds` by the operator and input shapes that launched them.

    Only kernels launched by an operator count (eager steps: warm-up, capture); a CUDA graph's
    replays launch theirs all at once, so the shares of the eager steps stand for them.
    """
    ops = {
        e["args"]["External id"]: f"{e['name']} {e['args'].get('Input Dims', '')}"
        for e in events
        if e.get("cat") == "cpu_op" and "External id" in e.get("args", {})
    }
    sites: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("cat") != "kernel" or kind_of(e["name"]) not in kinds:
            continue
        op = ops.get(e.get("args", {}).get("External id"))
        if op is not None:
            sites[(kind_of(e["name"]), op)][0] += float(e["dur"])
            sites[(kind_of(e["name"]), op)][1] += 1
    heaviest = sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"ms": round(ms / 1e3, 2), "calls": int(n), "kind": k, "op": op[:160]} for (k, op), (ms, n) in heaviest]


def summarize(trace: Path, top: int = 30) -> dict[str, Any]:
    """Device time by kind and by kernel, how busy the GPU was in each tenth of the run, and where copies come from."""
    events = _events(trace)
    kernels = _kernels(events)
    if not kernels:
        return {"trace": trace.name, "kernels": 0}
    first, last = kernels[0][0], max(ts + dur for ts, dur, _ in kernels)
    tenth = (last - first) / 10
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for _, dur, name in kernels:
        by_kind[kind_of(name)] += dur
        by_name[name][0] += dur
        by_name[name][1] += 1
    total = sum(by_kind.values())
    heaviest = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "trace": trace.name,
        "kernels": len(kernels),
        "span_ms": round((last - first) / 1e3, 1),
        "device_ms": round(total / 1e3, 1),
        "busy_by_tenth": [
            round(_busy_share(kernels, first + i * tenth, first + (i + 1) * tenth), 3) for i in range(10)
        ],
        "share_by_kind": {k: round(v / total, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "heaviest": [
            {"ms": round(ms / 1e3, 2), "calls": int(calls), "kind": kind_of(name), "name": name[:140]}
            for name, (ms, calls) in heaviest
        ],
        "copy_and_elementwise_sites": launch_sites(events),
    }


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(json.dumps(summarize(Path(path)), indent=1))
