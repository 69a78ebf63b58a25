"""Checkpoints that survive a kill at any instant.

A checkpoint is a folder `step-NNNNNN` holding the trainable weights (safetensors), the
optimizer and scheduler states and RNG states (torch), and `state.json` (step, data
position, micro-batch after OOM recovery, losses so far). It is written under
`step-NNNNNN.partial`, every file fsynced, then renamed into place and the parent folder
fsynced: a folder without the suffix is always complete. Older checkpoints are deleted
only after the new one is durable, and renamed to `step-NNNNNN.discarded` before their files
go, so a kill while deleting never leaves a listed folder half empty; leftover `.partial`
and `.discarded` folders are ignored and removed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from backpropagate.errors import RunFailedError, StateError
from backpropagate.export.files import fsync_dir
from backpropagate.log import get_logger

log = get_logger("checkpoint")

STEP_DIR = re.compile(r"^step-(\d{6,})$")
# Suffix of a checkpoint folder being deleted (never listed).
DISCARDED = ".discarded"
WEIGHTS = "trainable.safetensors"
TRAINING = "training_state.pt"
STATE = "state.json"
# How this process's optimizer runs (one fused kernel, foreach, per tensor): its own choice, kept on resume
# (a sharded run's whole and sharded tensors cannot share one kernel; a single process's can).
KERNEL_FLAGS = ("fused", "foreach")


@dataclass
class TrainState:
    """Where a run stands; everything resume needs besides tensors.

    Attributes:
        run_id: The run this state belongs to.
        step: Optimizer steps done.
        rows_consumed: Packed rows consumed from the shuffled stream (the data position).
        micro_batch: Rows per micro-batch (lower than configured after OOM recovery).
        tokens_seen: Tokens trained on so far.
        losses: [step, loss] of every step so far.
        eval_losses: [step, loss] of every evaluation so far.
        fingerprint: Settings that must not change across a resume.
        elapsed_s: Training time before this process.
    """

    run_id: str
    step: int = 0
    rows_consumed: int = 0
    micro_batch: int = 1
    tokens_seen: int = 0
    losses: list[list[float]] = field(default_factory=list)
    eval_losses: list[list[float]] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def halve_micro_batch(self, max_seq_length: int) -> None:
        """The last lever against running out of memory; RUNTIME_OOM_RECOVERY_EXHAUSTED once a row is alone."""
        if self.micro_batch <= 1:
            raise RunFailedError(
                "RUNTIME_OOM_RECOVERY_EXHAUSTED",
                f"step {self.step + 1} ran out of memory with one packed row per micro-batch ({max_seq_length} tokens)",
            )
        self.micro_batch //= 2


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) random states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what `rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_durable(path: Path, data: bytes) -> None:
    """Writes `data` to `path` and fsyncs it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(
    root: Path,
    state: TrainState,
    weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    keep: int,
    rank_rngs: list[dict[str, Any]] | None = None,
    write: bool = True,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Writes checkpoint `state.step` of the torch rail atomically under `root` and keeps the newest `keep`.

    `rank_rngs` holds every process's RNG states in rank order (default: this process's).
    The processes of a data-parallel run hold the same weights and optimizer state, so all
    but rank 0 pass `write=False` and only learn the folder's path. A sharded (FSDP) run
    passes its weights and `optimizer_state` gathered whole, in `optimizer.state_dict()`'s form.
    """
    if not write:
        return root / f"step-{state.step:06d}"
    cpu_weights = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    rngs = rank_rngs or [rng_state()]
    training = {
        "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rngs[0],
        "rank_rngs": rngs,
    }
    files = {WEIGHTS: save_safetensors(cpu_weights), TRAINING: _torch_bytes(training)}
    return write_checkpoint(root, state, files, keep)


def write_checkpoint(root: Path, state: TrainState, files: dict[str, bytes], keep: int) -> Path:
    """Writes `files` and `state.json` as checkpoint `state.step`: all or nothing, whichever rail made them.

    The folder is filled under `step-NNNNNN.partial`, every file fsynced, then renamed into
    place; older checkpoints beyond the newest `keep` go only once the new one is durable.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    partial = root / f"{final.name}.partial"
    try:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        for name, data in files.items():
            write_durable(partial / name, data)
        write_durable(partial / STATE, json.dumps(asdict(state)).encode())
        fsync_dir(partial)
        if final.exists():  # an earlier run reached this step before a resume from an older one
            _discard(final)
        os.replace(partial, final)
        fsync_dir(root)
    except OSError as exc:
        raise RunFailedError("RUNTIME_IO_FAILED", f"could not write checkpoint {final}: {exc}") from exc
    for old in checkpoints(root)[:-keep]:
        with contextlib.suppress(OSError):
            _discard(old)
    for leftover in [*root.glob("*.partial"), *root.glob(f"*{DISCARDED}")]:
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def _discard(folder: Path) -> None:
    """Deletes a checkpoint folder, first renaming it out of `checkpoints`' sight (a rename is atomic, rmtree not)."""
    doomed = folder.with_name(folder.name + DISCARDED)
    shutil.rmtree(doomed, ignore_errors=True)  # one an earlier kill left
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


@dataclass
class LoadedCheckpoint:
    """A checkpoint read back from disk."""

    path: Path
    state: TrainState
    weights: dict[str, torch.Tensor]
    training: dict[str, Any]


def read_state(path: Path) -> TrainState:
    """The `state.json` of one checkpoint folder."""
    try:
        return TrainState(**json.loads((path / STATE).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise StateError("STATE_CHECKPOINT_INVALID", f"{path / STATE} cannot be read ({exc})") from exc


def latest(root: Path) -> Path:
    """The newest complete checkpoint folder under `root`."""
    found = checkpoints(root)
    if not found:
        raise StateError("STATE_CHECKPOINT_NOT_FOUND", f"no checkpoint under {root}")
    return found[-1]


def resumed_run_id(root: Path) -> str:
    """The run id a resume continues: that of the newest checkpoint whose state can be read."""
    newest_first = list(reversed(checkpoints(root))) or [latest(root)]  # latest() raises when there are none
    for path in newest_first[:-1]:
        with contextlib.suppress(StateError):
            return read_state(path).run_id
    return read_state(newest_first[-1]).run_id


def load(path: Path) -> LoadedCheckpoint:
    """Reads one checkpoint folder, naming the file that cannot be read.

    Raises:
        StateError: STATE_CHECKPOINT_INVALID when a file is missing, truncated or corrupt.
    """
    state = read_state(path)
    current = path / WEIGHTS
    try:
        weights = load_safetensors(current.read_bytes())
        current = path / TRAINING
        training = torch.load(current, map_location="cpu", weights_only=False)
    except Exception as exc:  # safetensors, pickle and zip each raise their own kinds for a damaged file
        raise StateError("STATE_CHECKPOINT_INVALID", f"{current} cannot be read ({type(exc).__name__}: {exc})") from exc
    return LoadedCheckpoint(path=path, state=state, weights=weights, training=training)


def load_latest(root: Path) -> LoadedCheckpoint:
    """Reads the newest checkpoint under `root` that is intact, falling back past damaged ones.

    A damaged checkpoint is left on disk (it may be worth inspecting) and named in a warning.

    Raises:
        StateError: STATE_CHECKPOINT_NOT_FOUND when there is none, STATE_CHECKPOINT_INVALID
            when none can be read (the message names the newest one's bad file).
    """
    found = checkpoints(root)
    if not found:
        raise StateError("STATE_CHECKPOINT_NOT_FOUND", f"no checkpoint under {root}")
    first_error: StateError | None = None
    for path in reversed(found):
        try:
            loaded = load(path)
        except StateError as err:
            log.warning("checkpoint %s is damaged, trying the one before it: %s", path.name, err.message)
            first_error = first_error or err
            continue
        if first_error is not None:
            log.warning("resuming from %s, the newest intact checkpoint", path)
        return loaded
    assert first_error is not None
    raise StateError(
        "STATE_CHECKPOINT_INVALID",
        f"no intact checkpoint under {root}: {first_error.message}",
        hint="Start again without --resume (with --overwrite), or restore the checkpoint files from a backup.",
    )


def restore(
    loaded: LoadedCheckpoint,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int = 0,
    load: Callable[[dict[str, torch.Tensor], dict[str, Any]], None] | None = None,
) -> TrainState:
    """Copies a loaded checkpoint into the live parameters, optimizer, scheduler and RNGs.

    Process `rank` takes the RNG states that rank saved; a rank the saving run did not have
    (a resume on more processes) takes rank 0's. `load` (a sharded run's) takes the
    trainable weights and optimizer state in place of copying them into `params` and `optimizer`.
    """
    missing = sorted(set(params) - set(loaded.weights))
    if missing:
        raise StateError(
            "STATE_CHECKPOINT_INVALID", f"{loaded.path} lacks {len(missing)} trainable tensor(s), e.g. {missing[0]}"
        )
    kernels = [{k: g[k] for k in KERNEL_FLAGS if k in g} for g in optimizer.param_groups]
    if load is not None:
        load({name: loaded.weights[name] for name in params}, loaded.training["optimizer"])
    else:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(loaded.weights[name].to(param.device))
        optimizer.load_state_dict(loaded.training["optimizer"])
    for group, flags in zip(optimizer.param_groups, kernels, strict=True):
        group.update(flags)
    scheduler.load_state_dict(loaded.training["scheduler"])
    rngs = loaded.training.get("rank_rngs") or [loaded.training["rng"]]
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return loaded.state
