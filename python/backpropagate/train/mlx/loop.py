"""The MLX training loop, readable top to bottom in `train`.

It is the torch rail's loop (`backends/torch_loop.py`) on MLX, sharing its framework-free
parts: the shuffled row stream and held-out split, the learning-rate schedule, the run
state, checkpoint folder protocol, metrics, progress bar and stop on Ctrl-C. A step takes
`step_rows` packed rows (micro_batch x grad_accumulation, no row twice); each micro-batch's loss terms are divided by
the whole step's counts, so accumulation gives exactly the gradient of the step's mean
loss, and both rails draw the same loss curve from the same weights. The data position is
one int (rows consumed) and dropout is seeded from (seed, step), so a resumed run continues
the uninterrupted curve. When MLX cannot allocate, the micro-batch halves and the step
is retried with the same rows.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from backpropagate.config import TrainConfig
from backpropagate.data.dataset import Batch, PreparedDataset
from backpropagate.errors import RunFailedError
from backpropagate.log import get_logger
from backpropagate.train.checkpoint import TrainState
from backpropagate.train.interrupt import StopRequest
from backpropagate.train.metrics import MetricsLogger, ProgressBar
from backpropagate.train.mlx.checkpoint import load_latest, save_checkpoint
from backpropagate.train.mlx.losses import MlxObjective
from backpropagate.train.mlx.model import MlxTrainingModel, scalar
from backpropagate.train.torch.loop import (
    LoopOutcome,
    RowStream,
    check_fingerprint,
    lr_factor,
    micro_batches,
    split_rows,
    warmup_steps,
)
from backpropagate.train.torch.loop import rows_per_step as torch_rows_per_step
from backpropagate.train.torch.losses import step_totals

log = get_logger("train")


def is_out_of_memory(exc: BaseException) -> bool:
    """MLX reports a failed allocation as a RuntimeError naming malloc or memory."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("malloc" in text or "memory" in text or "allocate" in text)


def accumulate(
    tm: MlxTrainingModel, objective: MlxObjective, batches: list[Batch], loss_and_grad: Any
) -> tuple[float, Any, int]:
    """Forward and backward over the step's micro-batches; returns (step loss, summed gradients, tokens)."""
    totals = mx.array(np.array(step_totals(objective.host, batches), dtype=np.float32))
    loss_sum = mx.zeros(())
    grads: Any = None
    for batch in batches:
        loss, g = loss_and_grad(tm.net, objective.layout(batch), totals)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        loss_sum = loss_sum + loss
        mx.eval(loss_sum, grads)  # one micro-batch's graph in memory at a time
    return scalar(loss_sum), grads, sum(b.num_tokens for b in batches)


def train_step(
    tm: MlxTrainingModel,
    objective: MlxObjective,
    dataset: PreparedDataset,
    rows: np.ndarray,
    state: TrainState,
    loss_and_grad: Any,
) -> tuple[float, Any, int]:
    """One step's gradient, halving the micro-batch when MLX runs out of memory."""
    while True:
        try:
            return accumulate(tm, objective, micro_batches(dataset, rows, state.micro_batch), loss_and_grad)
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
        mx.clear_cache()
        state.halve_micro_batch(dataset.max_seq_length)
        log.warning("out of memory at step %d: micro-batch halved to %d row(s)", state.step + 1, state.micro_batch)


def evaluate(
    tm: MlxTrainingModel, objective: MlxObjective, dataset: PreparedDataset, rows: np.ndarray, micro: int
) -> float:
    """Mean loss over the held-out rows."""
    tm.net.eval()
    try:
        batches = micro_batches(dataset, rows, micro)
        totals = mx.array(np.array(step_totals(objective.host, batches), dtype=np.float32))
        loss = sum(((objective.loss_terms(tm.net, objective.layout(b)) / totals).sum() for b in batches), mx.zeros(()))
        return scalar(loss)
    finally:
        tm.net.train()


def train(
    tm: MlxTrainingModel,
    dataset: PreparedDataset,
    config: TrainConfig,
    total_steps: int,
    output_dir: Path,
    run_id: str,
    fingerprint: dict[str, Any],
    step_rows: int | None = None,
) -> LoopOutcome:
    """Trains `tm` for `total_steps` steps of `step_rows` packed rows, writing checkpoints and metrics.

    `step_rows` defaults to the torch rail's rule (`rows_per_step`: no row twice in one step).
    """
    assert config.learning_rate is not None
    objective = MlxObjective(config, dataset, tm.attention_share)
    train_rows, eval_rows = split_rows(dataset, config.eval_split, config.seed)
    stream = RowStream(dataset, train_rows, config.seed)
    rows_per_step = step_rows or torch_rows_per_step(config, stream.size)
    warmup = warmup_steps(config, total_steps)
    optimizer = optim.AdamW(
        learning_rate=config.learning_rate, weight_decay=config.weight_decay, bias_correction=True, eps=1e-8
    )
    fingerprint = {**fingerprint, "backend": "mlx"}
    state = TrainState(run_id=run_id, micro_batch=config.micro_batch, fingerprint=fingerprint)
    checkpoint_root = output_dir / "checkpoints"
    last_checkpoint: Path | None = None
    if config.resume:
        loaded = load_latest(checkpoint_root)
        check_fingerprint(loaded.state.fingerprint, fingerprint, loaded.path)
        tm.net.load_weights(list(loaded.trainable.items()), strict=False)
        optimizer.state = loaded.optimizer_state
        state, last_checkpoint = loaded.state, loaded.path
        log.info("resumed from %s at step %d (%d rows consumed)", loaded.path, state.step, state.rows_consumed)

    def step_loss(net: nn.Module, mb: Any, totals: mx.array) -> mx.array:
        return (objective.loss_terms(net, mb) / totals).sum()

    loss_and_grad = nn.value_and_grad(tm.net, step_loss)
    metrics = MetricsLogger(
        output_dir, run_id, config.report_to, {"mode": tm.mode, "backend": "mlx", **vars(config)}, state.step
    )
    bar = ProgressBar(total_steps, state.step, config.progress)
    mx.reset_peak_memory()
    started = time.perf_counter()
    elapsed_before = state.elapsed_s
    stop = StopRequest()
    try:
        with stop:
            while state.step < total_steps and not stop.requested:
                step_started = time.perf_counter()
                rows = stream.take(state.rows_consumed, rows_per_step)
                mx.random.seed(config.seed * 1_000_003 + state.step)  # dropout: a pure function of the step
                loss, grads, tokens = train_step(tm, objective, dataset, rows, state, loss_and_grad)
                if not math.isfinite(loss):
                    raise RunFailedError(
                        "RUNTIME_TRAINING_DIVERGED",
                        f"loss is {loss} at step {state.step + 1} (learning_rate={config.learning_rate})",
                    )
                grad_norm = float("nan")
                if config.max_grad_norm > 0:
                    grads, norm = optim.clip_grad_norm(grads, config.max_grad_norm)
                    grad_norm = scalar(norm)
                lr = config.learning_rate * lr_factor(state.step, warmup, total_steps, config.schedule)
                optimizer.learning_rate = lr
                optimizer.update(tm.net, grads)
                mx.eval(tm.net.trainable_parameters(), optimizer.state)
                state.step += 1
                state.rows_consumed += len(rows)
                state.tokens_seen += tokens
                state.losses.append([state.step, loss])
                step_s = max(time.perf_counter() - step_started, 1e-9)
                bar.update(state.step, loss, tokens / step_s)
                last = state.step == total_steps
                if state.step % config.log_every == 0 or last:
                    metrics.log(
                        state.step,
                        {
                            "loss": loss,
                            "lr": lr,
                            "grad_norm": grad_norm,
                            "tokens": tokens,
                            "tokens_per_s": round(tokens / step_s, 1),
                            "epoch": round(state.rows_consumed / stream.size, 4),
                            "micro_batch": state.micro_batch,
                            "peak_memory_gib": round(mx.get_peak_memory() / 2**30, 3),
                        },
                    )
                state.elapsed_s = elapsed_before + time.perf_counter() - started
                if len(eval_rows) and ((config.eval_every and state.step % config.eval_every == 0) or last):
                    eval_loss = evaluate(tm, objective, dataset, eval_rows, state.micro_batch)
                    state.eval_losses.append([state.step, eval_loss])
                    metrics.log(state.step, {"eval_loss": eval_loss})
                if (config.save_every and state.step % config.save_every == 0) or last or stop.requested:
                    last_checkpoint = save_checkpoint(
                        checkpoint_root, state, tm.trainable(), optimizer.state, config.keep_checkpoints
                    )
    finally:
        bar.close()
        metrics.close()
    return LoopOutcome(
        state=state,
        duration_s=time.perf_counter() - started,
        checkpoint=last_checkpoint,
        features=list(tm.features),
        stopped_by=stop.signal_name if state.step < total_steps else None,  # a finished run is finished
    )
