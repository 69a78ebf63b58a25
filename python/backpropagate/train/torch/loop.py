"""The PyTorch training loop (CUDA and CPU), readable top to bottom in `train`.

The data is a stream of packed rows in a reproducible shuffled order; an optimizer step
takes `micro_batch * grad_accumulation` rows, merges each `micro_batch` of them into one
padding-free micro-batch, and normalises every micro-batch's summed loss by the count of
the whole step (target tokens for SFT), so accumulation gives exactly the gradient of the
step's mean loss. Everything resume needs is the number of rows consumed, so the loss
curve after a resume is the curve the uninterrupted run would have drawn. An out-of-memory
error halves the micro-batch (the step keeps its rows, so accumulation doubles) and retries.
The loss and gradient norm of a step are read while the next step runs (readout.py), so the
host never waits for the GPU to drain; a diverged loss therefore stops the run one step
later, and always before a checkpoint or evaluation could take it in. On CUDA each
micro-batch's forward and backward replay as a CUDA graph where they can (step_graph.py).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backpropagate.config import TrainConfig
from backpropagate.data.dataset import Batch, PreparedDataset
from backpropagate.errors import ConfigError, DependencyError, RunFailedError
from backpropagate.log import get_logger
from backpropagate.train.checkpoint import TrainState, load_latest, restore, rng_state, save_checkpoint
from backpropagate.train.distributed import SINGLE, World, row_tokens
from backpropagate.train.interrupt import StopRequest
from backpropagate.train.metrics import MetricsLogger, ProgressBar
from backpropagate.train.thermal import TemperatureGuard, nvml_reader
from backpropagate.train.torch import fp8_gptq, fsdp, lora_fused
from backpropagate.train.torch.attention import packed_attention
from backpropagate.train.torch.linear_attention import linear_attention_layers
from backpropagate.train.torch.loading import TrainingModel
from backpropagate.train.torch.losses import (
    DeviceBatch,
    Objective,
    normalised_loss,
    step_counts,
    step_totals,
    to_device,
)
from backpropagate.train.torch.objectives import objective_for
from backpropagate.train.torch.preference import Policy
from backpropagate.train.torch.readout import Readout, step_mark
from backpropagate.train.torch.recompute import draws_random_numbers
from backpropagate.train.torch.step_graph import StepGraphs, matmul_timer

log = get_logger("train")

OOM_ERRORS: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError,)


class RowStream:
    """Packed rows in a shuffled order that is a pure function of (seed, epoch): the data position is one int."""

    def __init__(self, dataset: PreparedDataset, train_rows: np.ndarray, seed: int) -> None:
        self.dataset = dataset
        self.is_train = np.zeros(dataset.num_rows, dtype=bool)
        self.is_train[train_rows] = True
        self.size = int(self.is_train.sum())
        self.seed = seed
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        """Training rows of `epoch` in their shuffled order."""
        if epoch not in self._orders:
            rows = self.dataset.row_order(self.seed, epoch)
            self._orders = {epoch: rows[self.is_train[rows]]}
        return self._orders[epoch]

    def take(self, start: int, count: int) -> np.ndarray:
        """`count` rows from stream position `start` (crossing into the next epoch when needed)."""
        out: list[np.ndarray] = []
        taken, pos = 0, start
        while taken < count:
            epoch, offset = divmod(pos, self.size)
            chunk = self.order(epoch)[offset : offset + count - taken]
            out.append(chunk)
            taken += len(chunk)
            pos += len(chunk)
        return np.concatenate(out)


def split_rows(dataset: PreparedDataset, eval_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, evaluation rows): a fixed random `eval_split` of packed rows is held out."""
    rows = np.arange(dataset.num_rows)
    if eval_split <= 0 or dataset.num_rows < 2:
        return rows, rows[:0]
    held = min(dataset.num_rows - 1, max(1, round(eval_split * dataset.num_rows)))
    shuffled = np.random.default_rng([seed, 0xE7A1]).permutation(dataset.num_rows)
    return np.sort(shuffled[held:]), np.sort(shuffled[:held])


def calibration_ids(dataset: PreparedDataset, config: TrainConfig) -> torch.Tensor:
    """The first tokens of the training rows (held-out rows left out) that FP8 weights are rounded for (`fp8_gptq`)."""
    lengths = dataset.sample_lengths()
    samples: list[np.ndarray] = []
    count = 0
    for row in split_rows(dataset, config.eval_split, config.seed)[0]:
        samples.append(dataset.row_samples(int(row)))
        count += int(lengths[samples[-1]].sum())
        if count >= fp8_gptq.TOKENS:
            break
    return fp8_gptq.calibration_ids(dataset.batch_of(np.concatenate(samples)).input_ids[0], dataset.max_seq_length)


def micro_batches(dataset: PreparedDataset, rows: np.ndarray, rows_per_batch: int) -> list[Batch]:
    """Merges consecutive groups of `rows_per_batch` packed rows into padding-free micro-batches."""
    return [
        dataset.batch_of(np.concatenate([dataset.row_samples(int(r)) for r in rows[i : i + rows_per_batch]]))
        for i in range(0, len(rows), rows_per_batch)
    ]


def forward_hidden(tm: TrainingModel, batch: DeviceBatch) -> torch.Tensor:
    """Final hidden states [1, T, H] of a packed micro-batch (the LM head is left to the objective)."""
    autocast = torch.autocast(tm.device.type, dtype=torch.bfloat16) if tm.autocast else nullcontext()
    with autocast:
        out = tm.decoder(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            use_cache=False,
            **batch.attention_kwargs(),
        )
    hidden: torch.Tensor = out.last_hidden_state
    return hidden.to(tm.compute_dtype)  # fp32 under autocast (full fine-tuning); the LM head runs in bf16


def policy_of(tm: TrainingModel) -> Policy:
    """How an objective runs `tm` itself: forward to hidden states, and the adapter switched off."""
    disable = getattr(tm.model, "disable_adapter", None)
    return Policy(forward=lambda batch: forward_hidden(tm, batch), reference=disable)


def forward_backward(
    tm: TrainingModel, objective: Objective, batch: DeviceBatch, totals: torch.Tensor, weight: float = 1.0
) -> torch.Tensor:
    """One micro-batch: forward, loss normalised by the step's `totals` (times `weight`), backward; returns the loss.

    It never waits for the GPU, so it can be captured as a CUDA graph. A `weight` of 0 makes
    a padding pass: the collectives of a sharded model's forward and backward, no gradient.
    """
    hidden = forward_hidden(tm, batch)
    loss = normalised_loss(objective.loss_sum(hidden, tm.lm_head, batch), totals) * weight
    del hidden  # backward needs only what autograd saved
    loss.backward()
    return loss.detach()


def graph_obstacle(tm: TrainingModel, objective: Objective, config: TrainConfig) -> str | None:
    """Why the micro-batch step cannot run as a CUDA graph, or None when it can."""
    if not config.cuda_graphs:
        return "cuda_graphs=False"
    if config.fsdp:
        return "fsdp=True"
    if tm.device.type != "cuda":
        return "not on CUDA"
    if tm.mode not in ("lora", "qlora"):
        return f"mode={tm.mode}"
    if objective.name not in ("sft", "orpo", "simpo"):  # KTO builds its reference batches on the host
        return f"method={objective.name}"
    if draws_random_numbers(tm.model):
        return "dropout is on"
    if linear_attention_layers(tm.model):
        return "linear-attention layers size their kernels from the sample boundaries on the host"
    return None


def step_graphs(tm: TrainingModel, objective: Objective, config: TrainConfig, row_tokens: int) -> StepGraphs | None:
    """CUDA graphs for the micro-batch step, where every part of it can be captured."""
    obstacle = graph_obstacle(tm, objective, config)
    if obstacle is None and tm.recompute is not None:
        obstacle = tm.recompute.graph_obstacle(config.micro_batch * row_tokens)
    if obstacle is not None:
        if tm.device.type == "cuda":
            log.info("cuda graphs: not used (%s)", obstacle)
        return None
    model_config = tm.base.config
    hidden = model_config.hidden_size
    inter = getattr(model_config, "intermediate_size", 4 * hidden)
    timer = matmul_timer(hidden, inter, tm.compute_dtype, tm.device)
    return StepGraphs(
        lambda batch, totals: forward_backward(tm, objective, batch, totals),
        tm.trainable_parameters(),
        row_tokens,
        timer,
    )


def accumulate_gradients(
    tm: TrainingModel,
    objective: Objective,
    batches: list[Batch],
    graphs: StepGraphs | None,
    totals: torch.Tensor,
    passes: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Forward and backward over the micro-batches of one step, each normalised by the step's `totals`.

    A sharded model runs `passes` (every rank's largest count of micro-batches): the
    missing ones as padding passes over the first micro-batch, so every rank joins the same
    collectives; only the last pass reduce-scatters the gradients.

    Returns:
        (this process's share of the step's mean loss, on the device; its tokens).
    """
    run = graphs or (lambda batch, t: forward_backward(tm, objective, batch, t))
    loss_sum = torch.zeros((), device=tm.device)
    for i in range(passes or len(batches)):
        if passes is not None:
            fsdp.sync_gradients(tm, i == passes - 1)
        if i < len(batches):
            loss_sum += run(objective.device_batch(batches[i], tm.device), totals)
        else:
            forward_backward(tm, objective, objective.device_batch(batches[0], tm.device), totals, weight=0.0)
    return loss_sum, sum(b.num_tokens for b in batches)


def release_memory(device: torch.device) -> None:
    """Returns cached blocks after an out-of-memory error."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train_step(
    tm: TrainingModel,
    objective: Objective,
    dataset: PreparedDataset,
    rows: np.ndarray,
    state: TrainState,
    optimizer: torch.optim.Optimizer,
    graphs: StepGraphs | None = None,
    world: World = SINGLE,
    sharded: bool = False,
) -> tuple[torch.Tensor, int]:
    """Accumulates the gradient of one step, halving the micro-batch on out-of-memory errors.

    The step's normalising counts are summed over the processes once, before any backward
    (so a retry on one process never repeats a collective). A `sharded` model runs as many
    forward and backward passes on every rank (`accumulate_gradients`), and stops on an
    out-of-memory error: a retry on one rank alone would break the pairing of the collectives.
    """
    batches = micro_batches(dataset, rows, state.micro_batch)
    counts = to_device(np.array(step_counts(objective, batches), dtype=np.float32), torch.float32, tm.device)
    totals = world.sum(counts).clamp_(min=1)
    passes = world.most(len(batches)) if sharded else None
    while True:
        if tm.recompute is not None and tm.recompute.graph_obstacle(state.micro_batch * dataset.max_seq_length):
            graphs = None  # an offload's copies, or MLP slices back after an out-of-memory error
        try:
            return accumulate_gradients(tm, objective, batches, graphs, totals, passes)
        except OOM_ERRORS:
            pass  # leave the except block so the failed step's tensors can be freed
        if graphs is not None:
            graphs.reset()
        optimizer.zero_grad(set_to_none=True)
        release_memory(tm.device)
        if sharded:
            raise RunFailedError(
                "RUNTIME_OOM_RECOVERY_EXHAUSTED",
                f"step {state.step + 1} ran out of memory with fsdp=True, where one process cannot recompute more "
                "or halve its micro-batch alone (the others wait in the same collectives): lower micro_batch or "
                "max_seq_length, or shard over more devices",
            )
        if tm.recompute is not None and tm.recompute.back_off():
            continue
        state.halve_micro_batch(dataset.max_seq_length)
        log.warning(
            "out of memory at step %d: micro-batch halved to %d row(s), accumulation now %d",
            state.step + 1,
            state.micro_batch,
            math.ceil(len(rows) / state.micro_batch),
        )
        batches = micro_batches(dataset, rows, state.micro_batch)


@torch.no_grad()
def evaluate(
    tm: TrainingModel,
    objective: Objective,
    dataset: PreparedDataset,
    rows: np.ndarray,
    micro: int,
    world: World = SINGLE,
    sharded: bool = False,
) -> float:
    """Mean loss over the held-out rows (each process scores its share when there are enough rows).

    A `sharded` model runs as many forwards on every rank (the extra ones score nothing).
    """
    tm.model.eval()
    shared = len(rows) >= world.size
    try:
        batches = micro_batches(dataset, world.share(dataset, rows) if shared else rows, micro)
        terms = torch.zeros((), device=tm.device)
        for i in range(world.most(len(batches)) if sharded else len(batches)):
            device_batch = objective.device_batch(batches[min(i, len(batches) - 1)], tm.device)
            hidden = forward_hidden(tm, device_batch)
            if i < len(batches):
                terms = terms + objective.loss_sum(hidden, tm.lm_head, device_batch).float()
        if not shared:
            return float(normalised_loss(terms, step_totals(objective, batches)).item())
        counts = torch.tensor(step_counts(objective, batches), dtype=torch.float32, device=tm.device)
        return float(normalised_loss(world.sum(terms), world.sum(counts).clamp_(min=1)).item())
    finally:
        tm.model.train()


def build_optimizer(
    params: list[torch.nn.Parameter], config: TrainConfig, device: torch.device, mixed: bool = False
) -> torch.optim.Optimizer:
    """Fused AdamW, or bitsandbytes' (paged) 8-bit AdamW.

    `mixed` parameters (FSDP shards and whole tensors) cannot share a fused or foreach
    kernel: AdamW then updates them one tensor at a time.
    """
    assert config.learning_rate is not None
    if config.optimizer == "adamw":
        # One fused kernel per tensor on CUDA and CPU (the CPU's foreach path runs a dozen small ops per tensor).
        extra: dict[str, Any] = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
        if mixed:
            extra = {"foreach": False}
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay, **extra)
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise DependencyError(
            "DEP_MISSING_PACKAGE",
            f"optimizer={config.optimizer!r} needs bitsandbytes: pip install 'backpropagate[qlora]'",
        ) from exc
    cls = bnb.optim.PagedAdamW8bit if config.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    optimizer: torch.optim.Optimizer = cls(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return optimizer


def warmup_steps(config: TrainConfig, total_steps: int) -> int:
    """Warmup length: `warmup_steps` if set, else `warmup_ratio` of the run."""
    if config.warmup_steps is not None:
        return min(config.warmup_steps, total_steps)
    return math.ceil(config.warmup_ratio * total_steps)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int) -> Any:
    """Warmup, then cosine / linear decay to zero, or constant."""
    warmup = warmup_steps(config, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total_steps, config.schedule))


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuses to resume a checkpoint made with settings that would change the curve."""
    changed = [k for k in current if k in saved and saved[k] != current[k]]
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed)
        raise ConfigError(
            "CONFIG_INVALID_SETTING", f"cannot resume {path}: settings differ from the checkpoint's ({detail})"
        )


@dataclass
class LoopOutcome:
    """What the loop hands back to the trainer.

    Attributes:
        state: Where the run stands.
        duration_s: Wall time of the loop in this process.
        checkpoint: The newest checkpoint written.
        features: Fast paths that were used.
        stopped_by: The signal (SIGINT, SIGTERM) that stopped the run early, after its checkpoint.
        final_weights: A sharded run's trainable weights gathered whole (rank 0; empty on the others).
    """

    state: TrainState
    duration_s: float
    checkpoint: Path | None
    features: list[str]
    stopped_by: str | None = None
    final_weights: dict[str, torch.Tensor] | None = None


def rows_per_step(config: TrainConfig, train_rows: int) -> int:
    """Packed rows an optimizer step takes: micro_batch x grad_accumulation, but no row twice in one step."""
    wanted = config.micro_batch * config.grad_accumulation
    if train_rows < wanted:
        log.warning(
            "only %d packed training row(s) for micro_batch %d x grad_accumulation %d = %d rows per step: "
            "each step takes the %d row(s) once (a smaller batch); lower grad_accumulation to make this explicit",
            train_rows,
            config.micro_batch,
            config.grad_accumulation,
            wanted,
            train_rows,
        )
    return max(1, min(wanted, train_rows))


def train(
    tm: TrainingModel,
    dataset: PreparedDataset,
    config: TrainConfig,
    total_steps: int,
    output_dir: Path,
    run_id: str,
    fingerprint: dict[str, Any],
    step_rows: int | None = None,
    world: World = SINGLE,
) -> LoopOutcome:
    """Trains `tm` for `total_steps` optimizer steps of `step_rows` packed rows, writing checkpoints and metrics.

    `step_rows` defaults to `rows_per_step` of the training rows (the trainer passes the figure it recorded).
    In a `world` of several processes each takes its token-balanced share of every step's
    rows and the gradients are summed over them (`train/distributed.py`); rank 0 alone
    writes metrics and checkpoints, which hold every rank's RNG state.

    A SIGINT or SIGTERM stops it after the current step and a checkpoint (`LoopOutcome.stopped_by`).
    """
    objective = objective_for(config, dataset, policy_of(tm))
    train_rows, eval_rows = split_rows(dataset, config.eval_split, config.seed)
    stream = RowStream(dataset, train_rows, config.seed)
    step_rows = step_rows or rows_per_step(config, stream.size)
    sharded = config.fsdp and world.size > 1
    if sharded:
        fsdp.shard(tm)
    params = tm.trainable_parameters()
    optimizer = build_optimizer(params, config, tm.device, mixed=sharded and bool(fsdp.unsharded(params)))
    graphs = step_graphs(tm, objective, config, dataset.max_seq_length)
    scheduler = build_scheduler(optimizer, config, total_steps)
    state = TrainState(run_id=run_id, micro_batch=config.micro_batch, fingerprint=fingerprint)
    checkpoint_root = output_dir / "checkpoints"
    last_checkpoint: Path | None = None
    if config.resume:
        loaded = load_latest(checkpoint_root)
        check_fingerprint(loaded.state.fingerprint, fingerprint, loaded.path)
        state = restore(
            loaded,
            tm.trainable_state(),
            optimizer,
            scheduler,
            world.rank,
            (lambda weights, optim: fsdp.load_full_state(tm, optimizer, weights, optim)) if sharded else None,
        )
        last_checkpoint = loaded.path
        log.info("resumed from %s at step %d (%d rows consumed)", loaded.path, state.step, state.rows_consumed)
    reader = nvml_reader(tm.device.index or 0) if tm.device.type == "cuda" else None
    guard = (
        TemperatureGuard(reader, config.max_gpu_temp, config.gpu_resume_temp, config.max_gpu_pause) if reader else None
    )
    metrics = (
        MetricsLogger(output_dir, run_id, config.report_to, {"mode": tm.mode, **vars(config)}, state.step)
        if world.is_main
        else None
    )
    bar = ProgressBar(total_steps, state.step, config.progress and world.is_main)
    if tm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(tm.device)  # the recompute plan reads this run's peak
    if tm.recompute is not None:
        tm.recompute.prepare(tm.base.config, tm.compute_dtype, state.micro_batch * dataset.max_seq_length)
    started = time.perf_counter()
    elapsed_before = state.elapsed_s
    last_done = started  # when the previous step's work was finished (host clock, CPU)
    # (readout, step, tokens, lr, micro-batch, when the step was started, its GPU mark)
    pending: tuple[Readout, int, int, float, int, float, torch.cuda.Event | None] | None = None
    stopping = False  # every process's stop request of the last step, agreed on (one process: its own)

    def settle() -> None:
        """Takes the last step's loss and gradient norm off the device: checks, progress bar, metrics.

        A step's time runs from its start (or the end of the previous step's work, if that
        was still running on the GPU) to the end of its own work, so checkpoints, evaluation
        and a late readout never count towards it (readout.py).
        """
        nonlocal pending, last_done
        if pending is None:
            return
        readout, step, tokens, lr, micro, step_started, mark = pending
        pending = None
        loss, grad_norm = readout.values()
        if not math.isfinite(loss):
            raise RunFailedError(
                "RUNTIME_TRAINING_DIVERGED", f"loss is {loss} at step {step} (learning_rate={config.learning_rate})"
            )
        step_s = max(readout.seconds_since(max(step_started, last_done), mark), 1e-9)
        last_done = readout.done_at or last_done
        state.losses.append([step, loss])
        bar.update(step, loss, tokens / step_s)
        if metrics is not None and (step % config.log_every == 0 or step == total_steps):
            metrics.log(
                step,
                {
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": tokens,
                    "tokens_per_s": round(tokens / step_s, 1),
                    "epoch": round(state.rows_consumed / stream.size, 4),
                    "micro_batch": micro,
                },
            )

    try:
        with packed_attention(tm.model), StopRequest() as stop:
            while state.step < total_steps and not stopping:
                if world.size == 1 and pending is not None and pending[0].ready():
                    # A step the host waited through (long rows) reports now, not after the next one. With
                    # several processes each settles at the same point, so a diverged loss stops all of them
                    # before the next step's collectives.
                    settle()
                if guard is not None:
                    guard.wait_until_cool()
                step_started, mark = time.perf_counter(), step_mark(tm.device)
                rows = stream.take(state.rows_consumed, step_rows)
                mine = world.share(dataset, rows)
                loss, tokens = train_step(tm, objective, dataset, mine, state, optimizer, graphs, world, sharded)
                if world.size > 1:
                    loss = world.reduce_gradients(fsdp.unsharded(params) if sharded else params, loss)
                    tokens = int(row_tokens(dataset, rows).sum())
                stopping = world.any(stop.requested)  # all processes stop after the same step
                if config.max_grad_norm <= 0:
                    grad_norm = torch.full((), float("nan"), device=loss.device)
                elif sharded:
                    grad_norm = fsdp.clip_gradients(params, config.max_grad_norm, world)
                else:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                lora_fused.adapters_updated()
                scheduler.step()
                optimizer.zero_grad(set_to_none=graphs is None)  # graphs accumulate into fixed gradients
                readout = Readout(loss, grad_norm)
                settle()  # the previous step's values, while this step runs on the GPU
                planned = tm.recompute is not None and tm.recompute.plan(
                    tm.device, tm.base.config, tm.compute_dtype, state.micro_batch * dataset.max_seq_length
                )
                if sharded and tm.recompute is not None and state.step == 0:
                    planned = fsdp.agree_recompute(tm.recompute, world) or planned
                if planned and graphs is not None:
                    graphs.reset()  # graphs baked the previous plan in
                elif planned:  # kept layers run their MLP whole, which graphs can capture
                    graphs = step_graphs(tm, objective, config, dataset.max_seq_length)
                state.step += 1
                state.rows_consumed += len(rows)
                state.tokens_seen += tokens
                pending = (readout, state.step, tokens, lr, state.micro_batch, step_started, mark)
                last = state.step == total_steps
                evaluate_now = len(eval_rows) and ((config.eval_every and state.step % config.eval_every == 0) or last)
                save_now = (config.save_every and state.step % config.save_every == 0) or last or stopping
                if evaluate_now or save_now or readout.event is None:
                    # A checkpoint holds this step's loss, and a diverged step is never saved; on the
                    # CPU the step's work is already done, so there is nothing to overlap with.
                    settle()
                state.elapsed_s = elapsed_before + time.perf_counter() - started
                if evaluate_now:
                    eval_loss = evaluate(tm, objective, dataset, eval_rows, state.micro_batch, world, sharded)
                    state.eval_losses.append([state.step, eval_loss])
                    if metrics is not None:
                        metrics.log(state.step, {"eval_loss": eval_loss})
                if save_now:
                    weights, optimizer_state = (
                        fsdp.full_state(tm, optimizer) if sharded else (tm.trainable_state(), None)
                    )
                    last_checkpoint = save_checkpoint(
                        checkpoint_root,
                        state,
                        weights,
                        optimizer,
                        scheduler,
                        config.keep_checkpoints,
                        world.gather(rng_state()),
                        write=world.is_main,
                        optimizer_state=optimizer_state,
                    )
                    world.barrier()  # no rank reads a checkpoint (a resume) before it is complete
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    features = tm.features + ([tm.recompute.describe()] if tm.recompute is not None else [])
    if graphs is not None and graphs.entries:
        features.append(f"cuda_graphs[{len(graphs.entries)}]")
    return LoopOutcome(
        state=state,
        duration_s=time.perf_counter() - started,
        checkpoint=last_checkpoint,
        features=features,
        # A finished run is finished; a process stopped by another's signal reports SIGTERM.
        stopped_by=(stop.signal_name or "SIGTERM") if stopping and state.step < total_steps else None,
        final_weights=fsdp.full_weights(tm) if sharded else None,
    )
