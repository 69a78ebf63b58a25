"""A micro-batch's forward, loss and backward replayed as one CUDA graph.

A QLoRA step of a 7B model issues about 5,000 kernels; Python, autograd and the
dispatcher take longer to issue them than the GPU takes to run them, so the GPU waits on
the host. Captured once per batch shape, the whole forward, loss and backward replay with
a single launch and the GPU runs them back to back.

A graph replays fixed shapes at fixed addresses, so:

* each micro-batch is padded to a shape bucket (tokens, keys and targets to multiples of
  `BUCKET`, sample boundaries to multiples of `SAMPLE_BUCKET`). Padded tokens form one
  sample of their own that attends only to itself, and padded targets weigh 0, so the
  loss and gradients are those of the unpadded batch;
* the batch, the step's normalising counts and the loss live in static tensors;
* gradients accumulate into `.grad` tensors made once (the loop zeroes them in place);
* the adapters' compute-dtype copies are remade inside the graph (lora_fused).

A shape runs eagerly the first time it is seen (that warms kernels and compilers up at
that shape and trains on the batch), is captured right after, and replays from then on.
All graphs share one memory pool: a replay reads nothing that another replay wrote, apart
from the static inputs it is given. If a capture fails, the run carries on eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from backpropagate.backends import lora_fused
from backpropagate.backends.losses import DeviceBatch
from backpropagate.log import get_logger

log = get_logger("graphs")

BUCKET = 16
SAMPLE_BUCKET = 16
# Graphs kept at once; a run whose batches fall into more shape buckets runs the rest eagerly.
MAX_GRAPHS = 16


def _bucket(n: int, size: int) -> int:
    """Smallest multiple of `size` above `n` (strictly above: a padded row always has padding)."""
    return (n // size + 1) * size


def _static_like(t: torch.Tensor, length: int) -> torch.Tensor:
    return torch.zeros((*t.shape[:-1], length), dtype=t.dtype, device=t.device)


@dataclass
class _Entry:
    """The static tensors of one shape bucket and its graph (None until captured)."""

    batch: DeviceBatch
    totals: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None
    loss: torch.Tensor | None = None


def shape_key(batch: DeviceBatch) -> tuple[Any, ...]:
    """The bucket a batch pads to: what fixes a graph's shapes."""
    keys = None if batch.kv_index is None else _bucket(len(batch.kv_index), BUCKET)
    extra = tuple((name, tuple(t.shape)) for name, t in sorted(batch.extra.items()))
    return (
        _bucket(batch.input_ids.shape[1], BUCKET),
        keys,
        _bucket(len(batch.cu_seqlens), SAMPLE_BUCKET),
        _bucket(len(batch.targets), BUCKET),
        extra,
    )


def padded_batch(batch: DeviceBatch, max_seqlen: int) -> DeviceBatch:
    """Static tensors with the shapes of `batch`'s bucket (filled by `load`)."""
    tokens, keys, bounds, targets, _ = shape_key(batch)
    return replace(
        batch,
        input_ids=_static_like(batch.input_ids, tokens),
        position_ids=_static_like(batch.position_ids, tokens),
        cu_seqlens=_static_like(batch.cu_seqlens, bounds),
        max_seqlen=max_seqlen,
        target_positions=_static_like(batch.target_positions, targets),
        targets=_static_like(batch.targets, targets),
        target_sample=_static_like(batch.target_sample, targets),
        cu_seqlens_k=None if keys is None else _static_like(batch.cu_seqlens, bounds),
        max_seqlen_k=max_seqlen,
        kv_index=None if batch.kv_index is None or keys is None else _static_like(batch.kv_index, keys),
        target_weight=torch.zeros(targets, dtype=torch.float32, device=batch.targets.device),
        extra={name: torch.empty_like(t) for name, t in batch.extra.items()},
    )


def load(static: DeviceBatch, batch: DeviceBatch) -> None:
    """Copies `batch` into the static tensors of its bucket, padding as the module doc says.

    Padded tokens keep whatever valid ids and positions an earlier batch left there.
    """
    tokens, bounds, targets = batch.input_ids.shape[1], len(batch.cu_seqlens), len(batch.targets)
    static.input_ids[:, :tokens].copy_(batch.input_ids)
    static.position_ids[:, :tokens].copy_(batch.position_ids)
    static.cu_seqlens[:bounds].copy_(batch.cu_seqlens)
    static.cu_seqlens[bounds:].fill_(static.input_ids.shape[1])  # the padding sample, then empty ones
    if static.kv_index is not None and static.cu_seqlens_k is not None:
        assert batch.kv_index is not None and batch.cu_seqlens_k is not None
        keys = len(batch.kv_index)
        static.kv_index[:keys].copy_(batch.kv_index)
        static.kv_index[keys:].fill_(static.input_ids.shape[1] - 1)  # the padding sample's keys: a padded token
        static.cu_seqlens_k[:bounds].copy_(batch.cu_seqlens_k)
        static.cu_seqlens_k[bounds:].fill_(len(static.kv_index))
    static.target_positions[:targets].copy_(batch.target_positions)
    static.targets[:targets].copy_(batch.targets)
    static.target_sample[:targets].copy_(batch.target_sample)
    assert static.target_weight is not None
    static.target_weight[:targets].fill_(1.0)
    static.target_weight[targets:].fill_(0.0)
    for name, t in batch.extra.items():
        static.extra[name].copy_(t)


class StepGraphs:
    """Runs `step(batch, totals)` (forward, loss, backward; returns the loss) through per-bucket CUDA graphs.

    Args:
        step: The eager micro-batch step; it must not synchronise with the host.
        params: The trained parameters (their gradients must keep their addresses).
        max_seqlen: The longest sample a batch can hold (attention kernels are sized for it).
    """

    def __init__(
        self,
        step: Callable[[DeviceBatch, torch.Tensor], torch.Tensor],
        params: list[torch.nn.Parameter],
        max_seqlen: int,
    ) -> None:
        self.step = step
        self.params = params
        self.max_seqlen = max(max_seqlen, BUCKET)
        self.entries: dict[tuple[Any, ...], _Entry] = {}
        self.pool: Any = None
        self.enabled = True
        self.replays = 0

    def reset(self) -> None:
        """Drops every graph (after anything they baked in changed: recompute plan, out-of-memory recovery)."""
        self.entries.clear()
        self.pool = None

    def __call__(self, batch: DeviceBatch, totals: torch.Tensor) -> torch.Tensor:
        """The micro-batch's loss (gradients accumulated), replayed where a graph of its bucket exists."""
        key = shape_key(batch)
        entry = self.entries.get(key)
        if not self.enabled or (entry is None and len(self.entries) >= MAX_GRAPHS):
            return self.step(batch, totals)
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if entry is not None:
            load(entry.batch, batch)
            entry.totals.copy_(totals)
            assert entry.graph is not None and entry.loss is not None
            entry.graph.replay()
            self.replays += 1
            return entry.loss
        entry = _Entry(padded_batch(batch, self.max_seqlen), totals.clone())
        load(entry.batch, batch)
        loss = self.step(entry.batch, entry.totals)  # the warm-up at this shape trains on the batch
        self._capture(key, entry)
        return loss

    def _capture(self, key: tuple[Any, ...], entry: _Entry) -> None:
        graph = torch.cuda.CUDAGraph()
        lora_fused.adapters_updated()  # the graph must remake the adapter copies itself
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                entry.loss = self.step(entry.batch, entry.totals)
        except Exception as exc:  # any capture problem: train on eagerly, never stop the run
            self.enabled = False
            self.reset()
            log.warning("CUDA graph capture failed (%s: %s); training without graphs", type(exc).__name__, exc)
            return
        finally:
            lora_fused.adapters_updated()  # eager code must not read copies the capture only recorded
        if self.pool is None:
            self.pool = graph.pool()
        entry.graph = graph
        self.entries[key] = entry
        log.info("cuda graph %d captured (tokens, keys, boundaries, targets: %s)", len(self.entries), key[:4])
