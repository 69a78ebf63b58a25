"""Step scalars (loss, gradient norm) read back from the GPU one step late.

Reading a CUDA scalar with `.item()` makes the host wait until the GPU has drained its
queue; done every step, the GPU then idles while Python prepares and launches the next
step. Here the scalars are copied into pinned host memory behind the step's own work and
an event marks them; the loop reads them after it has queued the next step, so the host
waits only for work that is already done or nearly so, and the queue never runs dry.
A step's time is measured where its work runs. On the CPU, where work is synchronous, it
runs from the step's start to the moment its readout is made. On CUDA it is read off the
GPU's own timeline, from an event recorded as the step started to the readout's event: the
host's clock would be wrong whenever it learns late that a step finished (a later step's
launch that waits for the GPU, as capturing a CUDA graph does, delays it).
"""

from __future__ import annotations

import time

import torch


class Readout:
    """Scalars of one step on their way to the host.

    Args:
        values: 0-dim tensors (any device, any float dtype).
    """

    def __init__(self, *values: torch.Tensor) -> None:
        stacked = torch.stack([v.detach().float().reshape(()) for v in values])
        self.event: torch.cuda.Event | None = None
        self.done_at: float | None = None
        if stacked.is_cuda:
            self.host = torch.empty(stacked.shape, dtype=torch.float32, pin_memory=True)
            self.host.copy_(stacked, non_blocking=True)
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
        else:
            self.host = stacked
            self.done_at = time.perf_counter()

    def ready(self) -> bool:
        """Whether the step's work is done, so `values` would not wait (never waits itself)."""
        return self.done_at is not None or (self.event is not None and self.event.query())

    def values(self) -> list[float]:
        """The scalars as floats (waits for the step that made them, not for later work)."""
        if self.event is not None and self.done_at is None:
            self.event.synchronize()
            self.done_at = time.perf_counter()
        return [float(v) for v in self.host.tolist()]

    def seconds_since(self, started: float, mark: torch.cuda.Event | None) -> float:
        """The step's time: from `mark` (CUDA) or the host time `started` (CPU) to the end of its work."""
        self.values()
        if mark is not None and self.event is not None:
            return float(mark.elapsed_time(self.event)) / 1000
        assert self.done_at is not None
        return self.done_at - started


def step_mark(device: torch.device) -> torch.cuda.Event | None:
    """An event at the start of a step on `device`'s GPU timeline (None off CUDA)."""
    if device.type != "cuda":
        return None
    mark = torch.cuda.Event(enable_timing=True)
    mark.record()
    return mark
