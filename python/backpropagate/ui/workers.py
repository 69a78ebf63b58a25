"""Runs as worker processes, exports as background jobs, and the chat model, for the web UI.

A run is `backprop train ... --log-format json --json --no-progress` started in its own
process group with its own output folder under `<workspace>/runs/<name>`; its log lines
go to `worker.log` and its result to `worker.out` in that folder, so the run goes on
(and stays readable) when the browser closes or the web server restarts. Stop is SIGINT
(the trainer saves a checkpoint and exits 130); resume starts the same command again
with `--resume`. Everything a page shows is read back from the run folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backpropagate.cli.options import flag_name
from backpropagate.errors import BackpropagateError, StateError
from backpropagate.log import get_logger, redact
from backpropagate.runs.store import process_alive
from backpropagate.ui.workspace import Workspace, check_name

if TYPE_CHECKING:
    from backpropagate.generate import Generation

SPEC = "ui-run.json"
WORKER = "worker.json"
LOG = "worker.log"
RESULT = "worker.out"
METRICS = "metrics.jsonl"


@dataclass
class RunSpec:
    """What a run was started with: enough to start it again with `--resume`."""

    model: str
    data: str  # workspace-relative
    steps: int | None = None
    epochs: float | None = None
    options: dict[str, Any] = field(default_factory=dict)  # TrainConfig / DataConfig fields the user set

    def command(self, workspace: Workspace, folder: Path, resume: bool) -> list[str]:
        """The `backprop train` command line of this run."""
        script = Path(sys.executable).with_name("backprop")
        cmd = [str(script), "--log-format", "json", "train", "--model", self.model]
        cmd += ["--data", str(workspace.resolve(self.data)), "--output", str(folder), "--json", "--no-progress"]
        if self.steps is not None:
            cmd += ["--steps", str(self.steps)]
        if self.epochs is not None:
            cmd += ["--epochs", str(self.epochs)]
        for name, value in self.options.items():
            flag = flag_name(name)
            if isinstance(value, bool):
                cmd.append(flag if value else "--no-" + flag[2:])
            else:
                cmd += [flag, str(value)]
        if resume:
            cmd.append("--resume")
        return cmd


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when it is missing or not (yet) complete."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_lines(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Complete JSON-object lines of `path` from byte `offset`, and the offset after them."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
    records = []
    for line in data[:end].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records, offset + end


def log_line(record: dict[str, Any]) -> dict[str, Any]:
    """A worker log record as the page shows it (secrets redacted once more, for safety)."""
    ts = record.get("ts")
    stamp = time.strftime("%H:%M:%S", time.localtime(float(ts))) if isinstance(ts, (int, float)) else "--:--:--"
    text = record.get("message", "")
    if record.get("code"):
        text = f"[{record['code']}]: {text}"
    return {
        "time": stamp,
        "level": str(record.get("level", "info")),
        "message": redact(str(text)),
        "run_id": record.get("run_id"),
    }


class RunManager:
    """Starts, stops and reads the runs of one workspace."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def folder(self, name: str) -> Path:
        """`runs/<name>` inside the workspace (the name is checked)."""
        return self.workspace.resolve(f"runs/{check_name(name, 'run name')}")

    def names(self) -> list[str]:
        """Runs in the workspace, newest first."""
        runs = self.workspace.runs_dir()
        if not runs.is_dir():
            return []
        folders = [p for p in runs.iterdir() if p.is_dir() and (p / SPEC).is_file()]
        return [p.name for p in sorted(folders, key=lambda p: p.stat().st_mtime, reverse=True)]

    def spec(self, name: str) -> RunSpec:
        """The spec a run was started with."""
        found = read_json(self.folder(name) / SPEC)
        if found is None:
            raise StateError("STATE_RUN_NOT_FOUND", f"run {name!r}: no such run in the workspace's runs/ folder")
        return RunSpec(**found)

    def start(self, name: str, spec: RunSpec, resume: bool = False) -> None:
        """Starts (or resumes) run `name` as a worker process.

        Raises:
            StateError: STATE_OUTPUT_EXISTS when a new run's name is taken or the run is still going.
        """
        folder = self.folder(name)
        with self._lock:
            if self.running(name):
                raise StateError("STATE_OUTPUT_EXISTS", f"run {name!r} is still running")
            if not resume and folder.exists():
                raise StateError("STATE_OUTPUT_EXISTS", f"run {name!r} already exists; choose another name")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / SPEC).write_text(json.dumps(asdict(spec), indent=2), encoding="utf-8")
            (folder / RESULT).unlink(missing_ok=True)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            with open(folder / LOG, "ab") as log, open(folder / RESULT, "wb") as out:
                proc = subprocess.Popen(
                    spec.command(self.workspace, folder, resume),
                    cwd=self.workspace.root,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=log,
                    env=env,
                    start_new_session=True,  # its own process group: the server's Ctrl-C does not reach it
                )
            self._procs[name] = proc
            (folder / WORKER).write_text(json.dumps({"pid": proc.pid, "started": time.time()}), encoding="utf-8")
        threading.Thread(target=self._reap, args=(name, proc), daemon=True).start()

    def _reap(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        info = read_json(self.folder(name) / WORKER) or {}
        info["exit_code"] = code
        (self.folder(name) / WORKER).write_text(json.dumps(info), encoding="utf-8")

    def running(self, name: str) -> bool:
        """Whether the run's worker process is alive (also one started by an earlier server)."""
        proc = self._procs.get(name)
        if proc is not None:
            return proc.poll() is None
        info = read_json(self.folder(name) / WORKER)
        if not info or "exit_code" in info or not isinstance(info.get("pid"), int):
            return False
        return process_alive(info["pid"])

    def stop(self, name: str) -> bool:
        """Asks the run to stop (SIGINT to its process group: checkpoint, then exit 130)."""
        info = read_json(self.folder(name) / WORKER)
        if not info or not self.running(name):
            return False
        os.killpg(int(info["pid"]), signal.SIGINT)
        return True

    def stop_all(self) -> None:
        """Stops every run this server started (used when the test server shuts down)."""
        for name in list(self._procs):
            self.stop(name)

    def status(self, name: str) -> dict[str, Any]:
        """State, progress, speed, ETA and the last loss of a run, from its folder."""
        folder = self.folder(name)
        spec = self.spec(name)
        metrics, _ = read_lines(folder / METRICS)
        result = read_json(folder / RESULT)
        running = self.running(name)
        error = (result or {}).get("error") if result and result.get("ok") is False else None
        if running:
            state = "running"
        elif error is not None:
            state = "stopped" if error.get("code") in ("RUNTIME_INTERRUPTED", "RUNTIME_TERMINATED") else "failed"
        elif result is not None and "run_id" in result:
            state = "finished"
        else:
            state = "ended"  # killed without a result (e.g. SIGKILL)
        step = metrics[-1]["step"] if metrics else 0
        total = spec.steps
        eta = None
        if running and total and len(metrics) >= 2:
            per_step = (metrics[-1]["time"] - metrics[0]["time"]) / max(1, metrics[-1]["step"] - metrics[0]["step"])
            eta = round(max(0, total - step) * per_step, 1)
        return {
            "name": name,
            "state": state,
            "model": spec.model,
            "data": spec.data,
            "step": step,
            "total_steps": total,
            "loss": metrics[-1].get("loss") if metrics else None,
            "tokens_per_s": metrics[-1].get("tokens_per_s") if metrics else None,
            "eta_s": eta,
            "run_id": (result or {}).get("run_id") or _run_id(folder),
            "summary": result if state == "finished" else None,
            "error": {k: error[k] for k in ("code", "message", "hint")} if error else None,
            "updated": (folder / METRICS).stat().st_mtime if (folder / METRICS).exists() else None,
        }


def _run_id(folder: Path) -> str | None:
    records, _ = read_lines(folder / LOG)
    ids = [r["run_id"] for r in records if r.get("run_id")]
    return ids[-1] if ids else None


@dataclass
class ExportJob:
    """One export running in a background thread, with its progress."""

    fmt: str
    quantization: str | None
    ollama: bool
    state: str = "running"
    done: int = 0
    total: int = 0
    path: str | None = None
    error: dict[str, Any] | None = None
    seconds: float | None = None


class Exports:
    """At most one export per run at a time; each one's progress for the page."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self.jobs: dict[str, ExportJob] = {}
        self._lock = threading.Lock()

    def start(self, run: str, adapter: Path, fmt: str, quantization: str | None, ollama: bool) -> ExportJob:
        """Starts exporting `adapter` (a run's adapter folder) in a thread."""
        with self._lock:
            current = self.jobs.get(run)
            if current is not None and current.state == "running":
                raise StateError("STATE_OUTPUT_EXISTS", f"run {run!r}: an export is already running")
            job = self.jobs[run] = ExportJob(fmt, quantization, ollama)
        threading.Thread(target=self._work, args=(job, adapter), daemon=True).start()
        return job

    def _work(self, job: ExportJob, adapter: Path) -> None:
        from backpropagate.export import export

        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        try:
            result = export(
                adapter,
                job.fmt,  # type: ignore[arg-type]  # validated inside export()
                quantization=job.quantization,
                ollama=job.ollama,
                progress=progress,
            )
        except BackpropagateError as err:
            job.error = {"code": err.code, "message": redact(err.message), "hint": err.hint}
            job.state = "failed"
            return
        except Exception as exc:  # an uncoded failure still ends the job, with the details in the server's log
            get_logger("ui").exception("export of %s failed", adapter)
            job.error = {
                "code": "RUNTIME_GGUF_EXPORT_FAILED",
                "message": f"export failed ({type(exc).__name__})",
                "hint": "",
            }
            job.state = "failed"
            return
        job.path = self.workspace.relative(result.path)
        job.seconds = round(result.seconds, 1)
        job.state = "done"
        if result.ollama is not None and not result.ollama.registered:
            job.error = {"code": "DEP_OLLAMA_REGISTRATION_FAILED", "message": redact(result.ollama.message), "hint": ""}


class Chat:
    """The GGUF loaded in llama.cpp for the page's chat, kept open between messages."""

    def __init__(self) -> None:
        self._model: Any = None
        self._path: Path | None = None
        self._lock = threading.Lock()

    def reply(self, gguf: Path, messages: list[dict[str, str]], max_tokens: int) -> Generation:
        """The model's answer to the conversation `messages` (loads `gguf` if another one is open)."""
        from backpropagate.generate import GGUFModel

        with self._lock:
            if self._path != gguf:
                self._model = GGUFModel(gguf, n_ctx=1024)
                self._path = gguf
            answer: Generation = self._model.chat(messages, max_tokens=max_tokens)
            return answer


def gguf_files(folder: Path) -> list[Path]:
    """GGUF files an export wrote under a run folder."""
    return sorted(p for p in folder.rglob("*.gguf") if not p.name.startswith("."))


def gpu_status() -> list[dict[str, Any]]:
    """Memory and temperature of each NVIDIA GPU (NVML), or [] where there is none."""
    try:
        import pynvml

        pynvml.nvmlInit()
        cards = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            cards.append(
                {
                    "index": i,
                    "memory_used_gib": round(memory.used / 2**30, 2),
                    "memory_total_gib": round(memory.total / 2**30, 2),
                    "temperature_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
                }
            )
        return cards
    except Exception:  # no package, no driver, no card
        return []
