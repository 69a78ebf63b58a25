"""The dtype a run computes in: `precision` as the user gave it, or `auto` from the hardware.

bf16 halves the bytes of weights and activations and doubles matmul throughput, but only
where the hardware multiplies bf16 itself: CUDA GPUs, and CPUs with avx512_bf16 or AMX.
Elsewhere torch emulates it and it is slower than fp32, so `auto` is fp32 there.
"""

from __future__ import annotations

import torch

# torch's probes of the CPU's bf16 units (private; a torch without one counts as not having it).
BF16_CPU_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (avx512_bf16 or AMX)."""
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in BF16_CPU_PROBES)


def compute_dtype_for(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype `precision` names; `auto` is bf16 where the hardware computes it natively, else fp32."""
    if precision == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_computes_bf16())
        return torch.bfloat16 if native else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32
