"""Data parallelism over one process per device, started by torchrun (`torch.distributed.run`).

Every process holds the whole model and the whole prepared dataset, and walks the same
shuffled row stream: each optimizer step's rows are split between the ranks by token
count (`balanced_shares`), so no rank waits on a longer share. The step's normalising
counts are summed over the ranks before any backward, so every rank's loss terms are
divided by the global count; the gradients are then summed once per step, after all of a
rank's micro-batches (ranks may hold different numbers of them, which rules out DDP's
one-reduction-per-backward hooks), in flat buckets that also carry the loss. Every
rank therefore applies the same update to the same weights: rank 0 alone writes logs,
metrics, checkpoints and the final adapter. A failing rank leaves its coded error in the
rendezvous store and exits; the others, whose next collective then breaks, stop with
RUNTIME_DISTRIBUTED_FAILED naming it. `init_process_group` gets a timeout, so a rank that
hangs (rather than dies) cannot hold the rest forever. With `fsdp=True` the model itself is
sharded over the ranks instead of copied (`train/torch/fsdp.py`).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from backpropagate.config import TrainConfig
from backpropagate.data.dataset import PreparedDataset
from backpropagate.errors import BackpropagateError, ConfigError, DependencyError, RunFailedError
from backpropagate.log import get_logger
from backpropagate.settings import invalid

log = get_logger("distributed")

# How long a collective may wait for a rank that neither answers nor exits.
TIMEOUT = timedelta(minutes=30)
# Gradient elements summed per collective (256 MiB of fp32).
BUCKET_ELEMENTS = 64 * 2**20
# Store key under which a failing rank leaves its error for the others.
FAILURE_KEY = "backpropagate/failure"


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1).

    Attributes:
        rank: Global rank of this process.
        size: Number of processes.
        local_rank: Rank on this host (the CUDA device index it trains on).
        control: A gloo group for agreements the host makes (None: the default group is gloo).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    control: Any = None

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks, in place."""
        if self.size > 1:
            with self.collective():
                dist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank, agreed on the host (it never waits for a GPU)."""
        if self.size == 1:
            return flag
        votes = torch.tensor([float(flag)])
        with self.collective():
            dist.all_reduce(votes, group=self.control)
        return bool(votes.item() > 0)

    def barrier(self) -> None:
        """Waits until every rank gets here."""
        if self.size > 1:
            with self.collective():
                dist.barrier()

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (a picklable object)."""
        if self.size == 1:
            return value
        box = [value]
        with self.collective():
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order."""
        if self.size == 1:
            return [value]
        out: list[Any] = [None] * self.size
        with self.collective():
            dist.all_gather_object(out, value)
        return out

    @contextmanager
    def collective(self) -> Iterator[None]:
        """Turns a collective broken by a rank that left (or timed out) into RUNTIME_DISTRIBUTED_FAILED."""
        try:
            yield
        except RuntimeError as exc:  # gloo and NCCL report a lost peer or a timeout as RuntimeError (or a subclass)
            raise RunFailedError(
                "RUNTIME_DISTRIBUTED_FAILED", f"rank {self.rank} of {self.size} stopped: {_peer_note() or exc}"
            ) from exc

    def most(self, count: int) -> int:
        """The largest `count` of any rank."""
        return max(self.gather(count))

    def share(self, dataset: PreparedDataset, rows: np.ndarray) -> np.ndarray:
        """This rank's part of `rows` (all of them in one process), balanced by tokens."""
        if self.size == 1:
            return rows
        return rows[balanced_shares(row_tokens(dataset, rows), self.size)[self.rank]]

    def reduce_gradients(self, params: Sequence[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        """Sums the gradients of `params` and `loss` over the ranks; returns the summed loss.

        The gradients travel in flat fp32 buckets of at most `BUCKET_ELEMENTS` (the loss in
        the last), so a full fine-tune never holds a second copy of all its gradients. A
        parameter without a gradient (none of its inputs on this rank) counts as zeros.
        """
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        tensors = [p.grad for p in params if p.grad is not None] + [loss.detach().reshape(1)]
        buckets: list[list[torch.Tensor]] = [[]]
        size = 0
        for t in tensors:
            if buckets[-1] and size + t.numel() > BUCKET_ELEMENTS:
                buckets.append([])
                size = 0
            buckets[-1].append(t)
            size += t.numel()
        for bucket in buckets:
            flat = self.sum(torch.cat([t.reshape(-1).float() for t in bucket]))
            offset = 0
            for t in bucket[:-1] if bucket is buckets[-1] else bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
        return flat[-1].to(loss.dtype)


SINGLE = World()


def row_tokens(dataset: PreparedDataset, rows: np.ndarray) -> np.ndarray:
    """Tokens of each packed row in `rows`."""
    lengths = dataset.sample_lengths()
    return np.array([int(lengths[dataset.row_samples(int(r))].sum()) for r in rows], dtype=np.int64)


def balanced_shares(tokens: np.ndarray, parts: int) -> list[np.ndarray]:
    """Indices of `tokens` split into `parts` shares of near-equal token sums, each in its original order.

    Longest first, each to the share with the fewest tokens so far: the shares' totals then
    differ by at most the longest item, and by one item of the short ones in practice.
    """
    loads = np.zeros(parts, dtype=np.int64)
    owner = np.empty(len(tokens), dtype=np.int64)
    for i in np.argsort(-np.asarray(tokens), kind="stable"):
        share = int(np.argmin(loads))
        owner[i] = share
        loads[share] += tokens[i]
    return [np.flatnonzero(owner == share) for share in range(parts)]


def launched_world() -> World:
    """The world torchrun described in the environment (one process when it did not start this one)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    return World(rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


# The world this process joined (the process group is one per process).
_joined: list[World] = []


def join(device: str) -> World:
    """Joins the process group torchrun set up (once per process); NCCL between GPUs, gloo on the CPU.

    Args:
        device: The run's `device` setting; with CUDA each rank takes the card of its local rank.
    """
    world = launched_world()
    if world.size == 1:
        return world
    if _joined:
        return _joined[0]
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    atexit.register(dist.destroy_process_group)
    world = dataclasses.replace(world, control=dist.new_group(backend="gloo", timeout=TIMEOUT) if cuda else None)
    _joined.append(world)
    if not world.is_main:
        get_logger().setLevel(logging.WARNING)  # progress is logged by rank 0; warnings come from any rank
    return world


def rank_device(world: World, device: str) -> str:
    """The device setting of this rank: with `auto` or `cuda`, its own card (`cuda:<local rank>`) when there is one."""
    if world.size == 1 or device not in ("auto", "cuda") or not torch.cuda.is_available():
        return device
    return f"cuda:{world.local_rank}"


def launch(gpus: int, device: str, argv: list[str]) -> None:
    """Runs `backprop <argv>` as `gpus` processes under torch.distributed.run on this host and waits for them.

    Each process prints its own coded error; this one then names the rank that failed first.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if device != "cpu" and torch.cuda.device_count() < gpus:
        raise DependencyError(
            "DEP_GPU_NOT_AVAILABLE",
            f"gpus={gpus} asks for {gpus} CUDA devices but this machine has {torch.cuda.device_count()}",
            hint="Lower --gpus to the number of CUDA devices (`nvidia-smi -L` lists them).",
        )
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={gpus}", "-m", "backpropagate", *argv]))
    except ChildFailedError as exc:
        # Ranks the launcher stopped because another failed exit by a signal (a negative status).
        own = sorted(rank for rank, failure in exc.failures.items() if failure.exitcode > 0) or sorted(exc.failures)
        raise RunFailedError(
            "RUNTIME_DISTRIBUTED_FAILED",
            f"rank {own[0]} of {gpus} failed (exit status {exc.failures[own[0]].exitcode}; its error is printed "
            "above) and the other processes were stopped",
        ) from exc


def check_world(world: World, config: TrainConfig, rows_per_step: int) -> None:
    """Refuses a world that cannot train the run's settings before the model loads.

    That is one that does not match `config.gpus`, the MLX rail, steps too small to give
    every rank a row, or `fsdp` with one process or a mode it cannot shard.
    """
    from backpropagate.train.backend import resolve_backend

    if config.gpus > 1 and world.size != config.gpus:
        raise ConfigError(
            "CONFIG_INVALID_SETTING",
            f"gpus={config.gpus} needs {config.gpus} processes but this one runs in a world of {world.size}: train "
            f"with `backprop train --gpus {config.gpus}`, which starts them, or under "
            f"`torchrun --nproc-per-node {config.gpus} -m backpropagate train`",
        )
    if world.size == 1:
        if config.fsdp:
            raise ConfigError(
                "CONFIG_INVALID_SETTING",
                "fsdp=True shards the model over several processes but this run has one: train with --gpus 2 or "
                "more, or without --fsdp",
            )
        return
    if config.device not in ("auto", "cuda", "cpu"):
        raise invalid("device", config.device, "auto, cuda or cpu when training on several devices (one each)")
    if resolve_backend(config.backend) != "torch":
        raise invalid("backend", config.backend, "torch when training on several devices")
    if config.fsdp and config.mode not in ("lora", "full"):
        raise invalid(
            "mode",
            config.mode,
            "lora or full with fsdp=True (QLoRA's 4-bit weights are not sharded; auto would be QLoRA on CUDA)",
        )
    if rows_per_step < world.size:
        raise ConfigError(
            "CONFIG_INVALID_SETTING",
            f"a step of {rows_per_step} packed row(s) cannot feed {world.size} processes: raise micro_batch x "
            f"grad_accumulation to at least {world.size}, or train on fewer devices",
        )


@contextmanager
def failures(world: World) -> Iterator[None]:
    """Turns a failure on any rank into an error every rank reports, naming the rank that failed.

    The failing rank's coded error gains its rank and is left in the store for the others,
    whose next collective breaks when the failing rank exits (`World.collective`).
    """
    if world.size == 1:
        yield
        return
    try:
        yield
    except BackpropagateError as err:
        if err.code == "RUNTIME_DISTRIBUTED_FAILED":
            raise
        named = type(err)(err.code, f"rank {world.rank} of {world.size}: {err.message}", hint=err.hint)
        _leave_note(f"rank {world.rank} failed: {named}")
        raise named from err
    except Exception as exc:
        _leave_note(f"rank {world.rank} failed: {type(exc).__name__}: {exc}")
        raise


def _store() -> Any:
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def _leave_note(text: str) -> None:
    """Leaves `text` in the store for the other ranks (best effort: the store may be gone)."""
    try:
        _store().set(FAILURE_KEY, text)
    except Exception as exc:  # the store's host may have left first; the other ranks still stop
        log.debug("could not leave the failure note: %s", exc)


def _peer_note() -> str | None:
    """What a failed rank left in the store, if it did and the store still answers."""
    try:
        store = _store()
        if store.check([FAILURE_KEY]):
            return str(store.get(FAILURE_KEY).decode())
    except Exception as exc:  # the store's host (rank 0) left: nothing to read
        log.debug("no failure note readable: %s", exc)
    return None
