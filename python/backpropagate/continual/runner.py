"""`multi_run`: several training runs, one after another, joined into one adapter.

Layout of the output folder `OUT`:

* `OUT/data/`: every run's training and held-out rows (`tasks.py`).
* `OUT/run-01/`, `OUT/run-02/`, ...: normal run folders (`Trainer.train`), each run's
  adapter starting from the previous run's (`init_adapter.safetensors`, see `slao.py`).
* `OUT/merged/`: the merged adapter after the newest finished run (`slao.json` says which),
  replaced atomically after each run.
* `OUT/adapter/`: the final merged adapter, in PEFT layout with tokenizer files and run
  file (as `train` writes it), exportable like any other.
* `OUT/multi_run.json`: the plan and, per run, its status, losses and the merged adapter's
  held-out loss on its own and every earlier run's data.

The run history (`backprop runs`) records the multi-run, and each run with the multi-run as
its parent. Resumable at any point: a finished run is never redone, a run stopped mid-way continues
from its last checkpoint (`Trainer.train` with `resume`), and a merge is written before
its run is marked finished and is skipped when `slao.json` shows it done.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backpropagate import log
from backpropagate.continual import slao
from backpropagate.continual.config import MultiRunConfig
from backpropagate.continual.tasks import split_tasks, write_task
from backpropagate.errors import ConfigError, InputError, RunFailedError, StateError
from backpropagate.export.files import atomic_dir, write_text_atomic
from backpropagate.runs.record import RunRecording

PLAN_FILE = "multi_run.json"
MERGE_FILE = "slao.json"
ADAPTER_FILE = "adapter_model.safetensors"
# Options that say how this process runs, not what the multi-run is.
PROCESS_OPTIONS = ("output_dir", "resume", "overwrite", "progress")

logger = log.get_logger("multi_run")


@dataclass
class MultiRunResult:
    """What `multi_run` returns.

    Attributes:
        output_dir: The multi-run folder.
        adapter_dir: The final merged adapter (PEFT layout).
        plan_file: multi_run.json.
        runs: Per run: status, steps, losses and held-out losses (as in multi_run.json).
    """

    output_dir: Path
    adapter_dir: Path
    plan_file: Path
    runs: list[dict[str, Any]]


def read_plan(out: Path) -> dict[str, Any]:
    """The multi_run.json of `out`."""
    path = out / PLAN_FILE
    if not path.is_file():
        raise StateError(
            "STATE_MULTI_RUN_NOT_FOUND",
            f"resume: {out} holds no {PLAN_FILE}",
            hint="Start the multi-run without --resume, or point --output-dir at the folder of an earlier multi-run.",
        )
    plan: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return plan


def save_plan(out: Path, plan: dict[str, Any]) -> None:
    """Replaces multi_run.json atomically: a run is marked finished only once everything it wrote is in place."""
    write_text_atomic(out / PLAN_FILE, json.dumps(plan, indent=2))


def check_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuses a folder holding an earlier multi-run unless resuming; `overwrite` clears it first."""
    from backpropagate import run_folder

    earlier = (out / PLAN_FILE).exists() or any(out.glob("run-[0-9]*"))
    if earlier and not resume and not overwrite:
        raise StateError(
            "STATE_OUTPUT_EXISTS",
            f"{out} holds an earlier multi-run",
            hint="Pass --resume to continue it, --overwrite to replace it, or choose another --output-dir.",
        )
    run_folder.prepare(out, resume=resume, overwrite=overwrite)  # a file, unwritable -> coded errors
    if overwrite and not resume:
        for path in [*out.glob("run-[0-9]*"), out / "merged", out / "data", out / PLAN_FILE]:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def new_plan(
    out: Path, request: dict[str, Any], config: MultiRunConfig, data: list[Path], model_path: Path, settings: Any
) -> dict[str, Any]:
    """Splits and writes the data of every run, checks that all runs hold one data kind, writes the plan."""
    from backpropagate.config import check_data_kind
    from backpropagate.data import prepare

    tasks = split_tasks(data, config, settings.train.seed)
    runs = []
    kinds: dict[str, str] = {}
    for index, task in enumerate(tasks, start=1):
        train, heldout = write_task(out / "data", index, task)
        for path in (train, heldout):
            kinds[str(path)] = prepare(path, model_path, settings.data).kind
        runs.append(
            {
                "run": index,
                "name": f"run-{index:02d}",
                "source": task.source,
                "train_data": str(train.relative_to(out)),
                "heldout_data": str(heldout.relative_to(out)),
                "train_rows": len(task.train),
                "heldout_rows": len(task.heldout),
                "replay_rows": task.replayed,
                "learning_rate": settings.train.learning_rate * config.lr_decay ** (index - 1),
                "status": "pending",
            }
        )
    if len(set(kinds.values())) > 1:
        detail = ", ".join(f"{Path(p).name}: {k}" for p, k in kinds.items())
        raise InputError(
            "INPUT_DATASET_MIXED_KINDS",
            f"the runs' data hold different kinds of rows ({detail}); one adapter trains with one method",
        )
    check_data_kind(next(iter(kinds.values())), settings.train.method)
    plan = {"version": 1, "request": request, "status": "running", "runs": runs}
    save_plan(out, plan)
    return plan


def check_request(saved: dict[str, Any], current: dict[str, Any], out: Path) -> None:
    """Refuses to resume a multi-run with other data or settings than it was started with."""
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ConfigError("CONFIG_INVALID_SETTING", f"cannot resume {out}: the multi-run was started with ({detail})")


def write_merged(out: Path, state: slao.State, run: int, mode: str, run_adapter: Path) -> None:
    """Replaces `OUT/merged/` with the merged adapter after run `run` (atomically)."""
    from safetensors.torch import save_file

    with atomic_dir(out / "merged", force=True) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / ADAPTER_FILE))
        shutil.copyfile(run_adapter / "adapter_config.json", tmp / "adapter_config.json")
        (tmp / MERGE_FILE).write_text(
            json.dumps({"runs_merged": run, "merge_mode": mode, "b_weight": slao.time_scale(run)}), encoding="utf-8"
        )


def runs_merged(out: Path) -> int:
    """How many runs `OUT/merged/` holds (0 before the first merge)."""
    path = out / "merged" / MERGE_FILE
    return int(json.loads(path.read_text(encoding="utf-8"))["runs_merged"]) if path.is_file() else 0


def merge_run(out: Path, run: int, mode: str) -> None:
    """Merges run `run`'s adapter into `OUT/merged/`, unless that merge was already written."""
    from safetensors.torch import load_file

    done = runs_merged(out)
    if done >= run:
        return
    if done != run - 1:
        raise StateError("STATE_CHECKPOINT_INVALID", f"{out / 'merged'} holds {done} runs; run {run} cannot follow")
    adapter = out / f"run-{run:02d}" / "adapter"
    merged = load_file(out / "merged" / ADAPTER_FILE) if run > 1 else None
    write_merged(out, slao.merge_state(merged, load_file(adapter / ADAPTER_FILE), run, mode), run, mode, adapter)


def write_init(out: Path, run: int, mode: str) -> Path:
    """The adapter run `run` (> 1) starts from, written into its run folder."""
    from safetensors.torch import load_file, save_file

    previous = load_file(out / f"run-{run - 1:02d}" / "adapter" / ADAPTER_FILE)
    path = out / f"run-{run:02d}" / "init_adapter.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    save_file(slao.init_state(previous, mode), str(tmp))
    tmp.replace(path)
    return path


def heldout_losses(model_path: Path, config: Any, data_config: Any, adapter: Path, files: list[Path]) -> list[float]:
    """Mean loss of the base model with `adapter`'s weights on each held-out file."""
    import numpy as np

    from backpropagate.data import prepare
    from backpropagate.train.torch.attention import packed_attention
    from backpropagate.train.torch.loading import load_for_training
    from backpropagate.train.torch.loop import evaluate, policy_of
    from backpropagate.train.torch.objectives import objective_for

    tm = load_for_training(model_path, config, adapter)
    losses = []
    with packed_attention(tm.model):
        for path in files:
            dataset = prepare(path, model_path, data_config)
            objective = objective_for(config, dataset, policy_of(tm))
            losses.append(evaluate(tm, objective, dataset, np.arange(dataset.num_rows), config.micro_batch))
    del tm
    gc.collect()
    return losses


def wait_until_gpu_cool(config: Any) -> None:
    """The temperature guard between runs (inside a run, the loop runs it between steps)."""
    from backpropagate.train.thermal import TemperatureGuard, nvml_reader
    from backpropagate.train.torch.loading import resolve_device

    device = resolve_device(config.device)
    reader = nvml_reader(device.index or 0) if device.type == "cuda" else None
    if reader is not None:
        TemperatureGuard(reader, config.max_gpu_temp, config.gpu_resume_temp, config.max_gpu_pause).wait_until_cool()


def train_run(model: str, options: dict[str, Any], out: Path, record: dict[str, Any], steps: Any, epochs: Any) -> None:
    """Trains one run (continuing it from its last checkpoint if it has one) and records its results."""
    from backpropagate.trainer import Trainer

    run_dir = out / record["name"]
    resume = any((run_dir / "checkpoints").glob("step-*"))
    init = write_init(out, record["run"], options["merge_mode"]) if record["run"] > 1 else None
    run_options = {
        **options["train"],
        "output_dir": str(run_dir),
        "learning_rate": record["learning_rate"],  # the given (or preset) rate x lr_decay^(i-1)
        "resume": resume,
        "overwrite": not resume,
    }
    trainer = Trainer(model, **run_options)
    trainer.parent_run_id = options["parent_run_id"]  # the history links each run to its multi-run
    try:
        result = trainer.train(out / record["train_data"], steps=steps, epochs=epochs, init_adapter=init)
    except RunFailedError as err:
        if err.code not in ("RUNTIME_INTERRUPTED", "RUNTIME_TERMINATED"):
            raise
        raise RunFailedError(
            err.code,
            f"run {record['run']}: {err.message}",
            hint="Run the same multi-run again with --resume (resume=True): finished runs are kept and this run "
            "continues from its checkpoint.",
        ) from err
    record.update(
        run_id=result.run_id,
        steps=result.steps,
        final_loss=result.final_loss,
        losses=result.losses,
        adapter=str(result.adapter_dir.relative_to(out)),
    )


def finish_run(
    model: str,
    run_options: dict[str, Any],
    out: Path,
    plan: dict[str, Any],
    record: dict[str, Any],
    model_path: Path,
    settings: Any,
    steps: int | None,
    epochs: float | None,
) -> None:
    """Trains run `record`, merges it and measures the merged adapter on every held-out set so far."""
    wait_until_gpu_cool(settings.train)
    logger.info("multi-run %s: run %d of %d (%s)", out, record["run"], len(plan["runs"]), record["source"])
    record["status"] = "training"
    save_plan(out, plan)
    train_run(model, run_options, out, record, steps, epochs)
    merge_run(out, record["run"], run_options["merge_mode"])
    earlier = plan["runs"][: record["run"]]
    losses = heldout_losses(
        model_path,
        settings.train,
        settings.data,
        out / "merged" / ADAPTER_FILE,
        [out / r["heldout_data"] for r in earlier],
    )
    record["heldout_losses"] = {r["name"]: loss for r, loss in zip(earlier, losses, strict=True)}
    record["status"] = "done"
    save_plan(out, plan)
    logger.info("run %d done; merged adapter's held-out losses: %s", record["run"], record["heldout_losses"])


def save_adapter(
    out: Path, plan: dict[str, Any], model_ref: str, model_path: Path, settings: Any, merge_mode: str
) -> None:
    """Writes `OUT/adapter/` from the merged adapter, as `train` writes its adapter folder."""
    from backpropagate.train.outputs import save_final
    from backpropagate.train.torch.loading import load_for_training

    tm = load_for_training(model_path, settings.train, out / "merged" / ADAPTER_FILE)
    base_ref = model_ref if settings.preset and "/" in model_ref else str(model_path)
    run_info = {
        "run_id": plan["run_id"],
        "base_model": model_ref,
        "method": settings.train.method,
        "mode": tm.mode,
        "multi_run": {"merge_mode": merge_mode, "plan": PLAN_FILE, "runs": len(plan["runs"])},
        "hyperparameters": dataclasses.asdict(settings.train),
        "heldout_losses": plan["runs"][-1].get("heldout_losses"),
    }
    save_final(tm, out, model_path, base_ref, run_info, None)
    plan["status"] = "done"
    plan["adapter"] = "adapter"
    save_plan(out, plan)


def multi_run(
    model: str,
    options: dict[str, Any],
    data: list[str | Path] | str | Path,
    config: MultiRunConfig,
    steps: int | None = None,
    epochs: float | None = None,
) -> MultiRunResult:
    """Trains one run per chunk of `data` (or per file), joining them into one adapter; see the module docstring.

    Args:
        model: Preset, local folder or Hugging Face id (as for `Trainer`).
        options: `TrainConfig` / `DataConfig` options, forwarded to every run (output_dir is the
            multi-run's folder; resume / overwrite apply to the multi-run).
        data: One file (split into `config.runs` chunks) or one file per run.
        config: The multi-run's own settings.
        steps: Optimizer steps of each run.
        epochs: Passes over each run's rows (when `steps` is not given).
    """
    from backpropagate.config import resolve_settings
    from backpropagate.model_source import resolve_model
    from backpropagate.train.backend import resolve_backend

    settings = resolve_settings(model, options)
    if settings.train.resume_run is not None:
        raise ConfigError("CONFIG_INVALID_SETTING", "a multi-run resumes with resume=True (--resume), not resume_run")
    if settings.train.mode == "full" or resolve_backend(settings.train.backend) == "mlx":
        raise ConfigError(
            "CONFIG_INVALID_SETTING",
            f"multi-run trains one LoRA adapter on the torch backend; mode={settings.train.mode!r}, "
            f"backend={settings.train.backend!r} cannot take part",
        )
    files = [Path(p) for p in ([data] if isinstance(data, (str, Path)) else data)]
    if not files:
        raise ConfigError("CONFIG_INVALID_SETTING", "multi-run needs data: one file and --runs N, or one file per run")
    out = Path(options.get("output_dir") or Path("runs") / time.strftime("multi-%Y%m%d-%H%M%S")).expanduser()
    resume, overwrite = bool(options.get("resume")), bool(options.get("overwrite"))
    train_options = {k: v for k, v in options.items() if k not in PROCESS_OPTIONS}
    request = {
        "model": model,
        "options": train_options,
        "data": [str(p) for p in files],
        "steps": steps,
        "epochs": epochs,
        **dataclasses.asdict(config),
    }
    model_ref = settings.preset.model_id if settings.preset else model
    model_path = resolve_model(model_ref)
    if resume:
        plan = read_plan(out)
        check_request(plan["request"], request, out)
    else:
        check_folder(out, resume, overwrite)
        plan = new_plan(out, request, config, files, model_path, settings)
    run_options = {
        "train": {**train_options, "progress": options.get("progress", True)},
        "merge_mode": config.merge_mode,
        "parent_run_id": plan.setdefault("run_id", log.new_run_id()),  # the multi-run's id in the history
    }
    with RunRecording("multi-run") as recording:
        recording.start(
            plan["run_id"], model=model_ref, config=request, data=", ".join(request["data"]), output_dir=str(out)
        )
        for record in plan["runs"]:
            if record["status"] != "done":
                finish_run(model, run_options, out, plan, record, model_path, settings, steps, epochs)
        if plan["status"] != "done" or not (out / "adapter" / ADAPTER_FILE).is_file():
            save_adapter(out, plan, model_ref, model_path, settings, config.merge_mode)
        recording.complete(
            {"heldout_losses": plan["runs"][-1]["heldout_losses"], "runs": len(plan["runs"])},
            {"adapter_dir": str(out / "adapter"), "plan": str(out / PLAN_FILE)},
        )
    return MultiRunResult(output_dir=out, adapter_dir=out / "adapter", plan_file=out / PLAN_FILE, runs=plan["runs"])
