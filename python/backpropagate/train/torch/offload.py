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

Where the host cannot hold every input either, `replays` of the offloaded inputs are kept
nowhere: from the bottom layer up, in segments of up to `every` layers, a segment's first
input goes to the host and the others are left out, until `replays` are; every input above
those is stored (so a host one input short replays one layer, not every other one). When
backward reaches a segment's top layer, its unpack replays the segment's layers forward
from that first input, without autograd, and holds each layer's input on the device until
its own backward takes it. Each replayed input costs one more forward of its layer, and a
segment keeps up to `every` inputs on the card while it runs backward. A replayed input is the
same tensor as the forward's only where the layer above took the layer's own output as its
input (checked by identity in forward); anywhere else the input is stored as usual.

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

    def __init__(self, offload: ActivationOffload, tensor: torch.Tensor, below: _Handle | None) -> None:
        self.offload = offload
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device
        # The layer below runs its backward right after this one: it is the next to prefetch.
        self.below: weakref.ref[_Handle] | None = None if below is None else weakref.ref(below)
        self.position: int = 0  # in its segment of `every` layers
        self.replays: int = _replays(below)  # inputs replayed at or below this one in this forward
        self.call: _Call | None = None  # its layer's forward, for the replay of the layer above
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

    def peek(self) -> torch.Tensor:
        """The tensor on its device, once its copy has landed, still held here (a replay starts from it)."""
        self.prefetch()
        assert self.back is not None
        if self.arrived is not None:
            torch.cuda.current_stream(self.device).wait_event(self.arrived)
        return self.back

    def restore(self) -> torch.Tensor:
        """The tensor on its device, once its copy has landed; its host buffer goes back to the pool."""
        back = self.peek()
        assert self.host is not None
        # The host buffer is reused only by a later pack, which the side stream orders after this copy.
        self.offload.pool.give(self.host)
        self.back, self.host = None, None
        return back


class _Kept:
    """A saved tensor left on the device (the last layer's input: backward needs it first).

    Unpacking it starts the copy back of the layer below, as an offloaded one does.
    """

    def __init__(self, tensor: torch.Tensor, below: _Handle | None) -> None:
        self.tensor = tensor
        self.below: weakref.ref[_Handle] | None = None if below is None else weakref.ref(below)
        self.replays: int = _replays(below)

    def prefetch(self) -> None:
        """Nothing to fetch."""

    def peek(self) -> torch.Tensor:
        return self.tensor

    def restore(self) -> torch.Tensor:
        return self.tensor


class _Replayed:
    """A layer input kept nowhere: restored by replaying the layers below it from the segment's stored input."""

    def __init__(self, below: _Offloaded | _Replayed) -> None:
        self.below: weakref.ref[_Offloaded | _Replayed] = weakref.ref(below)
        self.tensor: torch.Tensor | None = None
        self.position: int = below.position + 1
        self.replays: int = below.replays + 1
        self.call: _Call | None = None

    def prefetch(self) -> None:
        """Starts the copy back of the segment's stored input, which the replay starts from."""
        below = self.below()
        if below is not None:
            below.prefetch()

    def peek(self) -> torch.Tensor:
        if self.tensor is None:
            self._replay()
        assert self.tensor is not None
        return self.tensor

    def restore(self) -> torch.Tensor:
        tensor = self.peek()
        self.tensor = None
        return tensor

    def _replay(self) -> None:
        """Runs the layers from the nearest input at hand up to this one forward, filling each replayed input on the way."""
        chain: list[Any] = [self]
        while isinstance(chain[-1], _Replayed) and chain[-1].tensor is None:
            below = chain[-1].below()
            assert below is not None, "a layer below was freed before the layers above it ran backward"
            chain.append(below)
        hidden = chain[-1].peek()
        with torch.no_grad():
            for lower, upper in zip(chain[:0:-1], chain[-2::-1], strict=True):
                hidden = lower.call(hidden)
                upper.tensor = hidden


def _replays(below: _Handle | None) -> int:
    """Inputs replayed at or below the handle `below` in this forward (0 at the first layer)."""
    return 0 if below is None else below.replays


class _Call:
    """A checkpointed layer's forward with every argument but its hidden state: the layer's input -> the next one's."""

    def __init__(self, forward: Callable[..., Any], rest: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.forward, self.rest, self.kwargs = forward, rest, kwargs

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.forward(hidden, *self.rest, **self.kwargs)
        return out if isinstance(out, torch.Tensor) else out[0]


_Handle = _Offloaded | _Kept | _Replayed


class ActivationOffload:
    """Saved-tensor hooks that keep checkpointed layers' inputs in host memory between forward and backward.

    Args:
        device: The training device (a side stream and pinned buffers on CUDA).
        every: The longest segment: its first input goes to the host, backward replays the others.
        replays: How many inputs a forward may leave to replay, the lowest segments' first (None: all
            but each segment's first).
    """

    def __init__(self, device: torch.device, every: int = 1, replays: int | None = None) -> None:
        cuda = device.type == "cuda"
        self.device_type = device.type
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.pool = _HostPool(pinned=cuda)
        self.every = every
        self.replays = replays
        self._last: weakref.ref[_Handle] | None = None
        # The checkpointed layer running now (its call and hidden input) and the output of the one before.
        self._call: _Call | None = None
        self._input: torch.Tensor | None = None
        self._output: weakref.ref[torch.Tensor] | None = None
        self.offloaded = 0
        self.replayed = 0

    def _pack(self, tensor: torch.Tensor, keep: bool) -> Any:
        if not tensor.is_floating_point() or tensor.device.type != self.device_type:
            return tensor  # indices are small; a host tensor (a CPU scalar) is in host memory already
        below = None if self._last is None else self._last()
        handle: _Handle
        if keep:
            handle = _Kept(tensor, below)
        else:
            if self._replayable(tensor, below):
                assert isinstance(below, (_Offloaded, _Replayed))
                handle = _Replayed(below)
                self.replayed += 1
            else:
                handle = _Offloaded(self, tensor, below)
                self.offloaded += 1
            handle.call = self._call if tensor is self._input else None
        self._last = weakref.ref(handle)
        return handle

    def _replayable(self, tensor: torch.Tensor, below: Any) -> bool:
        """Whether `tensor`, the input of the layer running now, is the output of the offloaded layer below, mid-segment."""
        return (
            self.every > 1
            and isinstance(below, (_Offloaded, _Replayed))
            and below.call is not None
            and below.position + 1 < self.every
            and (self.replays is None or below.replays < self.replays)
            and tensor is self._input
            and self._output is not None
            and self._output() is tensor
        )

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
    """`checkpoint(forward, *args)` with the checkpoint's saved inputs in host memory (`keep`: on the device).

    The layer's call is noted for the replay of the layer above, and its output to check that
    the layer above takes it as its input.
    """

    def run(forward: Any, *args: Any, **kwargs: Any) -> Any:
        offload._call = _Call(forward, args[1:], kwargs) if args else None
        offload._input = args[0] if args else None
        try:
            with offload.hooks(keep):
                out = checkpoint(forward, *args, **kwargs)
        finally:
            offload._call = offload._input = None
        hidden = out if isinstance(out, torch.Tensor) else out[0] if isinstance(out, (tuple, list)) and out else None
        offload._output = weakref.ref(hidden) if isinstance(hidden, torch.Tensor) else None
        return out

    return run
