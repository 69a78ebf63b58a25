"""Where training numbers go: metrics.jsonl always, TensorBoard / W&B when present, a progress bar, a plot.

`metrics.jsonl` is appended one JSON object per logged step (it survives a resume and is
what the plot and the run file are made from). TensorBoard is used when its package is
installed; W&B when installed and configured (WANDB_API_KEY or WANDB_MODE set), so an
installed but logged-out W&B never blocks a run on a login prompt.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backpropagate.export.files import atomic_file, write_text_atomic
from backpropagate.log import get_logger

log = get_logger("metrics")


def _wandb_configured() -> bool:
    return bool(os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"))


def sinks_for(report_to: str) -> set[str]:
    """The optional sinks a `report_to` setting asks for and this machine can serve."""
    if report_to == "none":
        return set()
    wanted = {"tensorboard", "wandb"} if report_to == "auto" else set(report_to.split(","))
    usable = set()
    if "tensorboard" in wanted and importlib.util.find_spec("tensorboard") is not None:
        usable.add("tensorboard")
    elif "tensorboard" in wanted and report_to != "auto":
        log.warning("report_to asks for TensorBoard but it is not installed (pip install tensorboard)")
    if (
        "wandb" in wanted
        and importlib.util.find_spec("wandb") is not None
        and (report_to != "auto" or _wandb_configured())
    ):
        usable.add("wandb")
    elif "wandb" in wanted and report_to != "auto":
        log.warning("report_to asks for W&B but wandb is not installed (pip install wandb)")
    return usable


def keep_records_until(path: Path, step: int) -> None:
    """Drops the records after `step` (atomically), so a resumed run logs each step once.

    Steps after the checkpoint a run resumes from were logged by the process that was
    killed; the resumed run logs them again. A run that starts afresh keeps nothing.
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by the kill
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))


class MetricsLogger:
    """Writes step metrics to every sink of the run."""

    def __init__(
        self, output_dir: Path, run_id: str, report_to: str, config: dict[str, Any], start_step: int = 0
    ) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        keep_records_until(self.path, start_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._tb: Any = None
        self._wandb: Any = None
        sinks = sinks_for(report_to)
        if "tensorboard" in sinks:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        if "wandb" in sinks:
            import wandb

            self._wandb = wandb.init(project="backpropagate", id=run_id, resume="allow", config=config)

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Appends one record for `step`."""
        record = {"step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(f"train/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def close(self) -> None:
        """Flushes and closes every sink."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


# Recent steps the ETA is estimated from.
ETA_WINDOW = 16


def eta_seconds(step_intervals: Sequence[float], remaining: int) -> float | None:
    """Remaining steps times the median wall time per step of `step_intervals` (None before any step).

    The median leaves out the first step's one-time costs and the odd checkpoint, and
    follows a change of pace within a few steps.
    """
    if not step_intervals:
        return None
    return max(remaining, 0) * statistics.median(step_intervals)


def format_duration(seconds: float | None) -> str:
    """`h:mm:ss`, or `-:--:--` when unknown."""
    if seconds is None:
        return "-:--:--"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class ProgressBar:
    """A rich progress bar with loss, the last step's tokens/s and an ETA (a no-op when disabled).

    The ETA comes from the wall time between the bar's own updates (`eta_seconds`), so it
    counts everything a step costs (checkpoints and evaluation included) and only steps
    (not whatever preceded the loop); rich's speed column would average over a time window
    that mixes the first step's one-time costs in for as long as 30 seconds.
    """

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self._progress: Any = None
        self.total = total
        self.intervals: deque[float] = deque(maxlen=ETA_WINDOW)
        self._last = (start, time.perf_counter())
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("eta {task.fields[eta]}"),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._progress.add_task(
            "train", total=total, completed=start, loss="-", tps="-", eta=format_duration(None)
        )
        self._progress.start()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        """Moves the bar to `step`; `tokens_per_s` is the step's tokens over its own time."""
        last_step, last_time = self._last
        now = time.perf_counter()
        if step > last_step:
            self.intervals.append((now - last_time) / (step - last_step))
            self._last = (step, now)
        if self._progress is not None:
            eta = format_duration(eta_seconds(self.intervals, self.total - step))
            self._progress.update(self._task, completed=step, loss=f"{loss:.4f}", tps=f"{tokens_per_s:,.0f}", eta=eta)

    def close(self) -> None:
        """Stops redrawing."""
        if self._progress is not None:
            self._progress.stop()


def plot_losses(losses: list[list[float]], eval_losses: list[list[float]], path: Path, title: str) -> Path | None:
    """Writes a PNG of the loss curve (atomically); None when matplotlib is missing or nothing was logged."""
    if not losses or importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps, values = zip(*losses, strict=True)
    ax.plot(steps, values, label="train", linewidth=1.2)
    if eval_losses:
        e_steps, e_values = zip(*eval_losses, strict=True)
        ax.plot(e_steps, e_values, "o-", label="eval", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path
