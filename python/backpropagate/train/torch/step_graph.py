"""A micro-batch's forward, loss and backward replayed as one CUDA graph.

A QLoRA step of a 7B model issues about 5,000 kernels; Python, autograd and the
dispatcher take longer to issue them than the GPU takes to run them, so the GPU waits on
the host. Captured once per batch shape, the whole forward, loss and backward replay with
a single launch and the GPU runs them back to back.

A graph replays fixed shapes at fixed addresses, so:

* each micro-batch is padded into the shape of a graph (by a few tokens, `slack`; sample
  boundaries and targets get more headroom, being nearly free). Padded tokens form one
  sample of their own that attends only to itself, and padded targets weigh 0, so the loss
  and gradients are those of the unpadded batch;
* the batch, the step's normalising counts and the loss live in static tensors;
* gradients accumulate into `.grad` tensors made once (the loop zeroes them in place);
* the adapters' compute-dtype copies are remade inside the graph (lora_fused).

A batch that no graph holds runs eagerly in a new shape (that warms kernels and compilers
up at that shape and trains on the batch), which is captured right after and replayed
from then on. All graphs share one memory pool: a replay reads nothing that another replay wrote, apart
from the static inputs it is given. If a capture fails, the run carries on eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from backpropagate.log import get_logger
from backpropagate.train.torch import lora_fused
from backpropagate.train.torch.losses import DeviceBatch

log = get_logger("graphs")

# Granularity of padded keys and targets, and of sample boundaries.
BUCKET = 16
SAMPLE_BUCKET = 16
# Padding a graph always accepts (more for large batches: `slack`).
SLACK = 64
# Graphs kept at once; batches that fit none of them once this many exist run eagerly.
MAX_GRAPHS = 16


def _round_up(n: int, size: int) -> int:
    return -(-n // size) * size


def slack(tokens: int) -> int:
    """Most padding a graph of `tokens` tokens accepts: `SLACK`, or 1/32 of it when larger."""
    return max(SLACK, tokens // 32)


def _static_like(t: torch.Tensor, length: int) -> torch.Tensor:
    return torch.zeros((*t.shape[:-1], length), dtype=t.dtype, device=t.device)


@dataclass(frozen=True)
class Shape:
    """A graph's static sizes.

    Attributes:
        tokens: Stored tokens (queries).
        keys: Gathered keys, or None when the keys are the stored tokens.
        bounds: Entries of the boundary tensors.
        targets: Target positions.
        extra: Name and shape of each objective tensor.
        rows: Samples of one length that fill the tokens exactly (attention runs them as a batch,
            `DeviceBatch.equal_rows`); the graph holds only such batches. 0: any samples.
    """

    tokens: int
    keys: int | None
    bounds: int
    targets: int
    extra: tuple[tuple[str, tuple[int, ...]], ...]
    rows: int = 0

    def holds(self, batch: DeviceBatch) -> bool:
        """Whether `batch` pads into this shape: at most `slack` padded tokens, and targets to spare.

        Padded queries form one sample; it needs more padded keys than queries, so that
        with the causal diagonal at the bottom right every padded query sees a key.
        """
        pad = self.tokens - batch.input_ids.shape[1]
        if not 0 <= pad <= slack(self.tokens) or (self.keys is None) != (batch.kv_index is None):
            return False
        if self.rows and (pad or batch.equal_rows != self.rows):
            return False
        if self.keys is not None and batch.kv_index is not None and self.keys - len(batch.kv_index) <= pad:
            return False
        return (
            self.bounds > len(batch.cu_seqlens)
            and 0 <= self.targets - len(batch.targets) <= max(SLACK, self.targets // 8)
            and self.extra == _extra_shapes(batch)
        )


def _extra_shapes(batch: DeviceBatch) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((name, tuple(t.shape)) for name, t in sorted(batch.extra.items()))


def shape_for(batch: DeviceBatch, tokens: int) -> Shape:
    """The shape that pads `batch` to `tokens` stored tokens (at least its own)."""
    pad = tokens - batch.input_ids.shape[1]
    keys = None if batch.kv_index is None else _round_up(len(batch.kv_index) + pad + 1, BUCKET)
    return Shape(
        tokens=tokens,
        keys=keys,
        bounds=_round_up(2 * len(batch.cu_seqlens), SAMPLE_BUCKET),  # sample counts vary most; empty ones are free
        targets=_round_up(len(batch.targets) * 17 // 16, BUCKET),  # headroom for later batches (only the LM head pays)
        extra=_extra_shapes(batch),
        rows=batch.equal_rows if pad == 0 else 0,
    )


def padded_batch(batch: DeviceBatch, shape: Shape, row_tokens: int) -> DeviceBatch:
    """Static tensors of `shape` for batches like `batch` (filled by `load`).

    Attention kernels are sized for the longest segment: a sample (at most `row_tokens`) or
    the padding sample.
    """
    max_seqlen = max(row_tokens, slack(shape.tokens) + BUCKET)
    return replace(
        batch,
        input_ids=_static_like(batch.input_ids, shape.tokens),
        position_ids=_static_like(batch.position_ids, shape.tokens),
        cu_seqlens=_static_like(batch.cu_seqlens, shape.bounds),
        max_seqlen=max_seqlen,
        target_positions=_static_like(batch.target_positions, shape.targets),
        targets=_static_like(batch.targets, shape.targets),
        target_sample=_static_like(batch.target_sample, shape.targets),
        cu_seqlens_k=None if shape.keys is None else _static_like(batch.cu_seqlens, shape.bounds),
        max_seqlen_k=max_seqlen,
        kv_index=None if batch.kv_index is None or shape.keys is None else _static_like(batch.kv_index, shape.keys),
        target_weight=torch.zeros(shape.targets, dtype=torch.float32, device=batch.targets.device),
        extra={name: torch.empty_like(t) for name, t in batch.extra.items()},
        equal_rows=shape.rows,
    )


def matmul_timer(hidden: int, intermediate: int, dtype: torch.dtype, device: torch.device) -> Callable[[int], float]:
    """Milliseconds of a decoder's largest matmul ([M, hidden] x [hidden, intermediate]) at M rows.

    The best of three rounds of five, after five to bring the clocks up: single timings of a
    half-millisecond kernel swing by more than the differences being looked for.
    """

    def timed(rows: int) -> float:
        weight = torch.randn(intermediate, hidden, device=device, dtype=dtype) * 0.02
        x = torch.randn(rows, hidden, device=device, dtype=dtype)
        for _ in range(5):
            F.linear(x, weight)
        best = float("inf")
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                F.linear(x, weight)
            end.record()
            end.synchronize()
            best = min(best, float(start.elapsed_time(end)) / 5)
        return best

    return timed


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


@dataclass
class _Entry:
    """A graph's shape, static tensors, and the graph itself (None until captured)."""

    shape: Shape
    batch: DeviceBatch
    totals: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None
    loss: torch.Tensor | None = None


class StepGraphs:
    """Runs `step(batch, totals)` (forward, loss, backward; returns the loss) through CUDA graphs.

    Args:
        step: The eager micro-batch step; it must not synchronise with the host.
        params: The trained parameters (their gradients must keep their addresses).
        row_tokens: Tokens of a packed row, the longest sample a batch can hold.
        timer: Time of the model's largest matmul at M rows: cuBLAS picks its kernels by
            shape, and a few tokens more can cost several percent (`token_length`).
    """

    def __init__(
        self,
        step: Callable[[DeviceBatch, torch.Tensor], torch.Tensor],
        params: list[torch.nn.Parameter],
        row_tokens: int,
        timer: Callable[[int], float] | None = None,
    ) -> None:
        self.step = step
        self.params = params
        self.row_tokens = row_tokens
        self.timer = timer
        self.entries: list[_Entry] = []
        self.pool: Any = None
        self.enabled = True
        self.replays = 0

    def reset(self) -> None:
        """Drops every graph (after anything they baked in changed: recompute plan, out-of-memory recovery)."""
        self.entries.clear()
        self.pool = None

    def token_length(self, tokens: int) -> int:
        """Stored tokens of a new graph for a batch of `tokens`.

        Packed rows nearly fill their `row_tokens`: when whole rows are within `slack`, the
        graph takes them, and holds every later batch of as many rows. Otherwise it takes the
        multiple of 8 within `slack` whose matmul `timer` finds cheapest.
        """
        whole = _round_up(tokens, self.row_tokens)
        if whole - tokens <= slack(whole):
            return whole
        step = max(8, _round_up(slack(tokens) // 16, 8))  # at most ~16 candidates to time
        candidates = list(range(_round_up(tokens, 8), tokens + slack(tokens) + 1, step))
        if self.timer is None:
            return candidates[0]
        return min(candidates, key=lambda m: (self.timer(m), m))  # type: ignore[misc]

    def __call__(self, batch: DeviceBatch, totals: torch.Tensor) -> torch.Tensor:
        """The micro-batch's loss (gradients accumulated), replayed where a graph holds its shape."""
        held = [e for e in self.entries if e.shape.holds(batch)]
        entry = min(held, key=lambda e: (e.shape.tokens, not e.shape.rows)) if held else None
        if not self.enabled or (entry is None and len(self.entries) >= MAX_GRAPHS):
            return self.step(batch, totals)
        if entry is not None:
            load(entry.batch, batch)
            entry.totals.copy_(totals)
            assert entry.graph is not None and entry.loss is not None
            entry.graph.replay()
            self.replays += 1
            return entry.loss
        for p in self.params:  # made once, before any graph bakes their addresses in (the loop never frees them)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        shape = shape_for(batch, self.token_length(batch.input_ids.shape[1]))
        entry = _Entry(shape, padded_batch(batch, shape, self.row_tokens), totals.clone())
        load(entry.batch, batch)
        loss = self.step(entry.batch, entry.totals)  # the warm-up at this shape trains on the batch
        self._capture(entry)
        return loss

    def _capture(self, entry: _Entry) -> None:
        graph = torch.cuda.CUDAGraph()
        lora_fused.adapters_updated()  # the graph must remake the adapter copies itself
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                entry.loss = self.step(entry.batch, entry.totals)
        except torch.OutOfMemoryError:
            raise  # the loop's recovery (recompute more, halve the micro-batch) takes it
        except Exception as exc:  # any other capture problem: train on eagerly, never stop the run
            self.enabled = False
            self.reset()
            log.warning("CUDA graph capture failed (%s: %s); training without graphs", type(exc).__name__, exc)
            return
        finally:
            lora_fused.adapters_updated()  # eager code must not read copies the capture only recorded
        if self.pool is None:
            self.pool = graph.pool()
        entry.graph = graph
        self.entries.append(entry)
        log.info("cuda graph %d captured for %s", len(self.entries), entry.shape)
