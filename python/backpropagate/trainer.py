"""`Trainer`: the 3-line API.

    trainer = Trainer("qwen2.5-7b")
    result = trainer.train("data.jsonl", steps=100)
    trainer.export("gguf", quantization="q4_k_m")

`Trainer(model, **options)` resolves the model (preset, local folder, hub id), fills the
options the user left unset from the preset, validates them and refuses what cannot work
(full fine-tuning of a large model) before any weight is read. `train` prepares the data,
loads the model, runs the loop and writes the adapter folder; `export` hands that folder
to the exporter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from backpropagate import log, run_folder
from backpropagate.config import TrainConfig, check_data_kind, resolve_settings
from backpropagate.data.dataset import PreparedDataset, dropped_lines_text
from backpropagate.errors import ConfigError, RunFailedError, StateError
from backpropagate.gguf_source import source_record
from backpropagate.model_source import resolve_model
from backpropagate.runs import record
from backpropagate.settings import at_least, check_value, positive

if TYPE_CHECKING:
    from backpropagate.continual import MultiRunResult
    from backpropagate.evaluate import EvalReport
    from backpropagate.export import ExportResult, Format
    from backpropagate.train.distributed import World


@dataclass
class TrainResult:
    """What `Trainer.train` returns.

    Attributes:
        run_id: Id carried by every log line of the run.
        steps: Optimizer steps done (in total, across resumes).
        losses: [step, loss] of every step.
        eval_losses: [step, loss] of every evaluation.
        final_loss: Loss of the last step.
        tokens_seen: Tokens trained on.
        duration_s: Wall time of the training loop (this process).
        output_dir: Root folder of the run.
        adapter_dir: The PEFT adapter folder (or the full model folder for mode="full").
        checkpoint_dir: The newest checkpoint.
        metrics_path: metrics.jsonl.
        loss_curve: loss.png (None without matplotlib).
        run_file: backpropagate_run.json inside `adapter_dir`.
        features: Fast paths that were used.
        data_stats: What data preparation read, used and dropped (`dropped`: reason -> rows).
    """

    run_id: str
    steps: int
    losses: list[list[float]]
    eval_losses: list[list[float]]
    final_loss: float
    tokens_seen: int
    duration_s: float
    output_dir: Path
    adapter_dir: Path
    checkpoint_dir: Path | None
    metrics_path: Path
    loss_curve: Path | None
    run_file: Path
    features: list[str] = field(default_factory=list)
    data_stats: dict[str, Any] = field(default_factory=dict)


def dataset_hash(dataset: PreparedDataset) -> str:
    """A digest of the prepared tokens, labels and packing plan (what the run actually saw)."""
    digest = hashlib.blake2b(digest_size=16)
    for array in (
        dataset.input_ids,
        dataset.labels,
        dataset.sample_offsets,
        dataset.pack_offsets,
        dataset.pack_samples,
    ):
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(str(dataset.max_seq_length).encode())
    return digest.hexdigest()


def method_settings(config: TrainConfig) -> dict[str, Any]:
    """The knobs of the training method (part of the resume fingerprint)."""
    prefix = {"orpo": "orpo_", "simpo": "simpo_", "kto": "kto_"}.get(config.method)
    if prefix is None:
        return {}
    return {k: v for k, v in dataclasses.asdict(config).items() if k.startswith(prefix)}


# Lines per drop reason that the log line names (`backprop validate` lists up to max_errors).
DROPPED_LINES_LOGGED = 5


def report_dropped(stats: dict[str, Any], source: Path) -> None:
    """Logs how many rows preparation used and, by reason, how many it dropped and where (first lines)."""
    dropped = stats.get("dropped") or {}
    reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(dropped.items()))
    where = dropped_lines_text(stats, str(source), limit=DROPPED_LINES_LOGGED)
    log.get_logger("train").info(
        "data: %d of %d rows used; %d dropped%s%s",
        stats.get("rows_used", 0),
        stats.get("rows_read", 0),
        sum(dropped.values()),
        f" ({reasons})" if reasons else "",
        f"; first lines: {where}" if where else "",
    )


def seed_everything(seed: int) -> None:
    """Seeds Python, numpy and torch (adapter initialisation and dropout depend on it)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cli_command(model: str, data: str | None, steps: int | None, epochs: float | None, options: dict[str, Any]) -> str:
    """The `backprop train` command line that reproduces a run."""
    parts = ["backprop", "train", "--model", model]
    if data is not None:
        parts += ["--data", data]
    if steps is not None:
        parts += ["--steps", str(steps)]
    if epochs is not None:
        parts += ["--epochs", str(epochs)]
    for name, value in options.items():
        if name in ("resume", "resume_run", "overwrite"):  # how this process started, not what the run is
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + name.replace("_", "-"))
        elif value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def stopped_error(
    signal_name: str, step: int, total_steps: int, checkpoint: Path | None, command: str
) -> RunFailedError:
    """The coded error of a run stopped by a signal after its checkpoint, saying how to resume."""
    code = "RUNTIME_TERMINATED" if signal_name == "SIGTERM" else "RUNTIME_INTERRUPTED"
    return RunFailedError(
        code,
        f"stopped by {signal_name} after step {step} of {total_steps}; checkpoint saved at {checkpoint}",
        hint=f"Continue the run with: {command} --resume",
    )


class Trainer:
    """Fine-tunes one model; see the module docstring for the 3-line use.

    Args:
        model: A preset name (`backprop info --presets`), a local model folder, or a Hugging Face id.
        **options: Any `TrainConfig` field (`backprop train --help` lists them with their docs).

    Attributes:
        parent_run_id: Run id that the history records as the parent of each `train` call's run
            (set by multi-run; None for a run of its own).
    """

    parent_run_id: str | None = None

    def __init__(self, model: str | Path = "tiny-llama", **options: Any) -> None:
        from backpropagate.train.torch.loading import check_fine_tuning_allowed

        self.model_name = str(model)
        self.options = dict(options)
        settings = resolve_settings(self.model_name, self.options)
        self.preset = settings.preset
        self.config = settings.train
        self.data_config = settings.data
        self.model_ref = self.preset.model_id if self.preset else self.model_name
        # Config and tokenizer only: a model too big for the mode is refused before its weights download.
        self.model_path = resolve_model(self.model_ref, weights=False)
        check_fine_tuning_allowed(self.model_path, self.config)
        self.result: TrainResult | None = None
        self._trained: Any = None

    @record.recorded_train
    def train(
        self,
        data: str | Path | PreparedDataset,
        steps: int | None = None,
        epochs: float | None = None,
        init_adapter: str | Path | None = None,
    ) -> TrainResult:
        """Trains on `data` for `steps` optimizer steps or `epochs` passes (default: 1 epoch).

        Args:
            data: A JSONL / JSON / Parquet file, or an already prepared dataset.
            steps: Optimizer steps to reach (with resume: in total, counting earlier steps).
            epochs: Passes over the training rows (when `steps` is not given).
            init_adapter: A PEFT `adapter_model.safetensors` whose weights the new adapter starts
                from (torch backend), instead of peft's initialisation.

        Returns:
            The run's `TrainResult`.

        Under torchrun (`backprop train --gpus N`) every process calls this; rank 0 writes the
        run's files and the others wait for them (`train/distributed.py`).
        """
        from backpropagate.train import distributed

        world = distributed.join(self.config.device)
        with distributed.failures(world):
            return self._train(world, data, steps, epochs, init_adapter)

    def _train(
        self,
        world: World,
        data: str | Path | PreparedDataset,
        steps: int | None,
        epochs: float | None,
        init_adapter: str | Path | None,
    ) -> TrainResult:
        from backpropagate.train import distributed
        from backpropagate.train.backend import resolve_backend
        from backpropagate.train.checkpoint import resumed_run_id
        from backpropagate.train.metrics import plot_losses
        from backpropagate.train.outputs import RUN_FILE, save_final
        from backpropagate.train.torch import loop as torch_loop
        from backpropagate.train.torch.loading import load_for_training

        if steps is not None and epochs is not None:
            raise ConfigError("CONFIG_INVALID_SETTING", "give steps or epochs, not both")
        if steps is not None:
            check_value("steps", steps, at_least(1))
        if epochs is not None:
            check_value("epochs", epochs, positive())
        output_dir = world.from_main(
            run_folder.prepare(
                run_folder.choose(self.config.output_dir, self.config.resume),
                resume=self.config.resume,
                overwrite=self.config.overwrite,
            )
            if world.is_main
            else None
        )
        config = dataclasses.replace(
            self.config, output_dir=str(output_dir), device=distributed.rank_device(world, self.config.device)
        )
        previous_run = resumed_run_id(output_dir / "checkpoints") if config.resume else None
        run_id = log.start_run(world.from_main(previous_run or log.new_run_id()))
        if world.is_main:
            record.started(
                run_id,
                model=self.model_ref,
                config={**dataclasses.asdict(config), "data_config": dataclasses.asdict(self.data_config)},
                data=str(data) if not isinstance(data, PreparedDataset) else None,
                output_dir=str(output_dir),
                metrics_path=str(output_dir / "metrics.jsonl"),
            )
        if not world.is_main:
            world.barrier()  # rank 0 prepares the data (and caches it) first; the others then read its cache entry
        dataset = self._dataset(data)
        if world.is_main:
            world.barrier()
        check_data_kind(dataset.kind, config.method)
        train_rows = torch_loop.split_rows(dataset, config.eval_split, config.seed)[0]
        rows_per_step = torch_loop.rows_per_step(config, len(train_rows))
        total_steps = steps or max(1, math.ceil((epochs or 1.0) * len(train_rows) / rows_per_step))
        distributed.check_world(world, self.config, rows_per_step)
        fingerprint = {
            "model": self.model_ref,
            "mode": config.mode,
            "method": config.method,
            "lora_r": config.lora_r,
            "lora_alpha": config.lora_alpha,
            "target_modules": config.target_modules,
            "dora": config.dora,
            "rslora": config.rslora,
            "seed": config.seed,
            "rows_per_step": rows_per_step,
            "eval_split": config.eval_split,
            "data_hash": dataset_hash(dataset),
            "data_config": dataclasses.asdict(self.data_config),
            **method_settings(config),
            **({"init_adapter": str(init_adapter)} if init_adapter is not None else {}),
        }
        data_ref = str(data) if not isinstance(data, PreparedDataset) else None
        seed_everything(config.seed)
        self.model_path = resolve_model(self.model_ref)  # now the weights (the same folder, completed)
        trained: Any  # either rail's model; save_final takes both
        if resolve_backend(config.backend) == "mlx":
            from backpropagate.train.mlx import run as run_mlx

            if init_adapter is not None:
                raise ConfigError("CONFIG_INVALID_SETTING", "init_adapter needs backend='torch' for now")

            trained, outcome = run_mlx(
                self.model_path, dataset, config, total_steps, output_dir, run_id, fingerprint, rows_per_step
            )
        else:
            calibration = torch_loop.calibration_ids(dataset, config) if config.fp8 else None
            trained = load_for_training(
                self.model_path, config, Path(init_adapter) if init_adapter else None, calibration
            )
            outcome = torch_loop.train(
                trained, dataset, config, total_steps, output_dir, run_id, fingerprint, rows_per_step, world
            )
        self._trained = trained
        state = outcome.state
        command = cli_command(self.model_name, data_ref, steps, epochs, {**self.options, "output_dir": str(output_dir)})
        if outcome.stopped_by is not None:
            raise stopped_error(outcome.stopped_by, state.step, total_steps, outcome.checkpoint, command)
        curve = (
            plot_losses(
                state.losses,
                state.eval_losses,
                output_dir / "loss.png",
                f"{self.model_ref} {trained.mode} {config.method}",
            )
            if world.is_main
            else None
        )
        run_info = {
            "run_id": run_id,
            "base_model": self.model_ref,
            "base_model_source": source_record(self.model_path),
            "method": config.method,
            "mode": trained.mode,
            "hyperparameters": {
                **dataclasses.asdict(config),
                "mode": trained.mode,
                "steps": total_steps,
                "rows_per_step": rows_per_step,
                "final_micro_batch": state.micro_batch,
            },
            "data": data_ref,
            "data_config": fingerprint["data_config"],
            "data_stats": dataset.stats,
            "data_hash": fingerprint["data_hash"],
            "final_loss": state.losses[-1][1] if state.losses else None,
            "eval_losses": state.eval_losses,
            "losses": state.losses,
            "tokens_seen": state.tokens_seen,
            "loss_curve": curve.name if curve else None,
            "features": outcome.features,
            "command": command,
        }
        base_ref = self.model_ref if self.preset and "/" in self.model_ref else str(self.model_path)
        final_dir, curve = world.from_main(  # the others wait here until rank 0 has written the adapter
            (
                save_final(
                    trained,
                    output_dir,
                    self.model_path,
                    base_ref,
                    run_info,
                    curve,
                    outcome.final_weights,
                ),
                curve,
            )
            if world.is_main
            else None
        )
        self.result = TrainResult(
            run_id=run_id,
            steps=state.step,
            losses=state.losses,
            eval_losses=state.eval_losses,
            final_loss=state.losses[-1][1] if state.losses else float("nan"),
            tokens_seen=state.tokens_seen,
            duration_s=outcome.duration_s,
            output_dir=output_dir,
            adapter_dir=final_dir,
            checkpoint_dir=outcome.checkpoint,
            metrics_path=output_dir / "metrics.jsonl",
            loss_curve=curve,
            run_file=final_dir / RUN_FILE,
            features=outcome.features,
            data_stats=dict(dataset.stats),
        )
        log.get_logger("train").info(
            "trained %d steps in %.1f s, final loss %.4f -> %s",
            state.step,
            outcome.duration_s,
            self.result.final_loss,
            final_dir,
        )
        return self.result

    def multi_run(
        self,
        data: str | Path | list[str | Path],
        steps: int | None = None,
        epochs: float | None = None,
        **multi_options: Any,
    ) -> MultiRunResult:
        """Continual training: one run per chunk of `data` (or per file), joined into one adapter.

        Every option of this `Trainer` is forwarded to each run; `multi_options` are
        `MultiRunConfig` fields (runs, samples_per_run, holdout, replay, lr_decay, merge_mode).
        See `backpropagate.continual.runner` for the output layout and resume.
        """
        from backpropagate.continual import multi_run, multi_run_config

        result = multi_run(self.model_name, self.options, data, multi_run_config(multi_options), steps, epochs)
        self.result = None
        self.config = dataclasses.replace(self.config, output_dir=str(result.output_dir))
        return result

    def evaluate(self, data: str | Path | None = None, prompts: str | Path | None = None, **kwargs: Any) -> EvalReport:
        """Held-out loss and perplexity on `data`, scored answers to `prompts`, of the trained adapter.

        Args:
            data: Held-out SFT rows (prepared with this trainer's data settings).
            prompts: JSONL of {"prompt"} or {"messages"} rows, with optional "reference".
            **kwargs: Passed on to `backpropagate.evaluate.evaluate` (max_new_tokens, device).
        """
        from backpropagate.evaluate import evaluate

        return evaluate(self._final_dir(), data, prompts, data_config=self.data_config, **kwargs)

    def export(self, fmt: Format, quantization: str | None = None, **kwargs: Any) -> ExportResult:
        """Exports the trained adapter (or full model) with `backpropagate.export.export`.

        Args:
            fmt: Export format: "lora", "merged" or "gguf".
            quantization: e.g. "q4_k_m" for GGUF.
            **kwargs: Passed on (output, force, ollama, ollama_name, ollama_host, system).
        """
        source = self._final_dir()
        from backpropagate.export import export

        return export(source, fmt, quantization=quantization, **kwargs)

    def _final_dir(self) -> Path:
        if self.result is not None:
            return self.result.adapter_dir
        output_dir = Path(self.config.output_dir) if self.config.output_dir else None
        for name in ("adapter", "model"):
            if output_dir is not None and (output_dir / name).is_dir():
                return output_dir / name
        raise StateError(
            "STATE_CHECKPOINT_NOT_FOUND",
            "nothing to export yet: call train() first, or pass output_dir= of a finished run",
            hint="Train first (trainer.train(...)), or point output_dir at a finished run's folder.",
        )

    def _dataset(self, data: str | Path | PreparedDataset) -> PreparedDataset:
        if isinstance(data, PreparedDataset):
            return data
        path = Path(data)
        from backpropagate.data import prepare

        dataset = prepare(path, self.model_path, self.data_config)
        report_dropped(dataset.stats, path)
        return dataset
