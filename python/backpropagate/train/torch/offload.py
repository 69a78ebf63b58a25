"""Activation offload: a recomputed layer's saved input waits in host memory for its backward.

With every decoder layer recomputed, what stays alive between forward and backward is
each layer's input, one [tokens, hidden] tensor per layer: at 300k tokens on an 8B model
that is 2.4 GB a layer, 77 GB for 32 layers. Non-reentrant checkpointing saves those
inputs through the default saved-tensor hooks (the layer's own activations go through the
checkpoint's inner hooks), so `torch.autograd.graph.saved_tensors_hooks` around a
checkpointed layer sees exactly that one tensor:

* pack (forward, right after the layer's input is saved): copy it into a pinned host
  buffer on a side CUDA stream, after an event orders the copy behind the kernels that
  wrote it; the device block is handed back to the allocator once the copy is done
  (`record_stream`), so forward never waits for the transfer.
* unpack (backward, when the layer is about to be recomputed): wait for this layer's
  copy back, and start the copy back of the layer below, which backward reaches next, so
  each transfer overlaps a layer's recomputation and backward.

Host buffers are pooled by size and reused by the next micro-batch (page-locking memory
costs more than the copy). On the CPU the same path runs with plain buffers and no streams: the
"offload" is a copy to another buffer and back, which is what the gradient tests check.
"""

from __future__ import annotations

import functools
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from backpropagate.log import get_logger

log = get_logger("offload")


class _HostPool:
    """Host byte buffers by size, page-locked on CUDA hosts, reused across micro-batches.

    Buffers are allocated pageable and registered with CUDA (`cudaHostRegister`) rather than
    taken from PyTorch's pinned allocator, which rounds each block up to a power of two: a
    2.3 GB layer input would hold 4 GB of locked host memory.
    """

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self.free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.owned: list[torch.Tensor] = []
        self.registered: list[int] = []
        self.bytes_held = 0
        weakref.finalize(self, _unregister, self.registered)

    def take(self, nbytes: int) -> torch.Tensor:
        if self.free[nbytes]:
            return self.free[nbytes].pop()
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        if self.pinned:
            if int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0)) == 0:
                self.registered.append(buffer.data_ptr())
            else:  # copies from pageable memory still work, synchronously
                log.warning("could not page-lock %.1f GiB of host memory for activation offload", nbytes / 2**30)
        self.owned.append(buffer)  # a registered buffer is freed only after `clear` unregisters it
        self.bytes_held += nbytes
        return buffer

    def give(self, buffer: torch.Tensor) -> None:
        self.free[buffer.numel()].append(buffer)

    def clear(self) -> None:
        """Frees the pooled buffers (before the micro-batch is halved: other sizes follow)."""
        _unregister(self.registered)
        self.free.clear()
        self.owned.clear()
        self.bytes_held = 0


def _unregister(pointers: list[int]) -> None:
    for pointer in pointers:
        torch.cuda.cudart().cudaHostUnregister(pointer)
    pointers.clear()


class _Offloaded:
    """One saved tensor in host memory, and its way back to the device."""

    def __init__(self, offload: ActivationOffload, tensor: torch.Tensor, below: _Offloaded | _Kept | None) -> None:
        self.offload = offload
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device
        # The layer below runs its backward right after this one: it is the next to prefetch.
        self.below: weakref.ref[_Offloaded | _Kept] | None = None if below is None else weakref.ref(below)
        self.host: torch.Tensor | None = offload.pool.take(tensor.numel() * tensor.element_size())
        self.back: torch.Tensor | None = None
        self.arrived: torch.cuda.Event | None = None
        stream = offload.stream
        host = self.host.view(self.dtype).view(self.shape)
        if stream is None:
            host.copy_(tensor)
            return
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # its block is reused only after the copy has read it

    def prefetch(self) -> None:
        """Starts the copy back to the device (on the side stream on CUDA); idempotent."""
        if self.back is not None or self.host is None:
            return
        host = self.host.view(self.dtype).view(self.shape)
        self.back = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        stream = self.offload.stream
        if stream is None:
            self.back.copy_(host)
            return
        stream.wait_stream(torch.cuda.current_stream(self.device))  # `back` was allocated on the compute stream
        with torch.cuda.stream(stream):
            self.back.copy_(host, non_blocking=True)
            self.arrived = torch.cuda.Event()
            self.arrived.record(stream)

    def restore(self) -> torch.Tensor:
        """The tensor on its device, once its copy has landed; its host buffer goes back to the pool."""
        self.prefetch()
        assert self.back is not None and self.host is not None
        if self.arrived is not None:
            torch.cuda.current_stream(self.device).wait_event(self.arrived)
        # The host buffer is reused only by a later pack, which the side stream orders after this copy.
        self.offload.pool.give(self.host)
        back, self.back, self.host = self.back, None, None
        return back


class _Kept:
    """A saved tensor left on the device (the last layer's input: backward needs it first).

    Unpacking it starts the copy back of the layer below, as an offloaded one does.
    """

    def __init__(self, tensor: torch.Tensor, below: _Offloaded | _Kept | None) -> None:
        self.tensor = tensor
        self.below: weakref.ref[_Offloaded | _Kept] | None = None if below is None else weakref.ref(below)

    def prefetch(self) -> None:
        """Nothing to fetch."""

    def restore(self) -> torch.Tensor:
        return self.tensor


class ActivationOffload:
    """Saved-tensor hooks that keep checkpointed layers' inputs in host memory between forward and backward.

    Args:
        device: The training device (a side stream and pinned buffers on CUDA).
    """

    def __init__(self, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.device_type = device.type
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.pool = _HostPool(pinned=cuda)
        self._last: weakref.ref[_Offloaded | _Kept] | None = None
        self.offloaded = 0

    def _pack(self, tensor: torch.Tensor, keep: bool) -> Any:
        if not tensor.is_floating_point() or tensor.device.type != self.device_type:
            return tensor  # indices are small; a host tensor (a CPU scalar) is in host memory already
        below = None if self._last is None else self._last()
        handle = _Kept(tensor, below) if keep else _Offloaded(self, tensor, below)
        self._last = weakref.ref(handle)
        self.offloaded += not keep
        return handle

    @staticmethod
    def _unpack(saved: Any) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        below = saved.below() if saved.below is not None else None
        tensor = saved.restore()
        if below is not None:
            below.prefetch()  # overlaps this layer's recomputation and backward
        return tensor

    @contextmanager
    def hooks(self, keep: bool = False) -> Iterator[None]:
        """Offloads what autograd saves inside (a checkpointed layer's inputs); `keep` leaves it on the device."""
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(self._pack, keep=keep), self._unpack):
            yield

    @property
    def host_bytes(self) -> int:
        """Host memory the pooled buffers hold."""
        return self.pool.bytes_held


def offloaded(checkpoint: Callable[..., Any], offload: ActivationOffload, keep: bool = False) -> Callable[..., Any]:
    """`checkpoint(forward, *args)` with the checkpoint's saved inputs in host memory (`keep`: on the device)."""

    def run(forward: Any, *args: Any, **kwargs: Any) -> Any:
        with offload.hooks(keep):
            return checkpoint(forward, *args, **kwargs)

    return run
