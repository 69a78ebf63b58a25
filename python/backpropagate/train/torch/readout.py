"""Step scalars (loss, gradient norm) read back from the GPU one step late.

Reading a CUDA scalar with `.item()` makes the host wait until the GPU has drained its
queue; done every step, the GPU then idles while Python prepares and launches the next
step. Here the scalars are copied into pinned host memory behind the step's own work and
an event marks them; the loop reads them after it has queued the next step, so the host
waits only for work that is already done or nearly so, and the queue never runs dry.
`done_at` is when the host knew the step's work was finished, the end of its wall time:
on the CPU, where work is synchronous, the moment the readout is made; on CUDA, the moment
its event is reached.
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
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = stacked
            self.done_at = time.perf_counter()

    def values(self) -> list[float]:
        """The scalars as floats (waits for the step that made them, not for later work)."""
        if self.event is not None and self.done_at is None:
            self.event.synchronize()
            self.done_at = time.perf_counter()
        return [float(v) for v in self.host.tolist()]
