"""Errors with stable codes, one-line hints and a retryable flag.

Every failure a user can meet is a `BackpropagateError` whose code is listed in
`CATALOG`. The CLI prints `[CODE]: message` and the hint, and exits with the family's
status, so scripts can branch on codes and exit statuses without parsing prose.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CodeInfo:
    """What the catalog knows about one code."""

    hint: str
    retryable: bool = False


# Exit statuses by family. 130 is the shell convention for SIGINT.
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_DEPENDENCY = 4
EXIT_RUNTIME = 5
EXIT_STATE = 6
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as shells report it

CATALOG: dict[str, CodeInfo] = {
    # CONFIG_*: a setting is wrong; fix the command line or the call.
    "CONFIG_INVALID_SETTING": CodeInfo("Check the option's allowed values in `backprop COMMAND --help`."),
    "CONFIG_OUTPUT_DIR_INVALID": CodeInfo(
        "Choose an --output-dir that is a folder you can write to (or does not exist yet)."
    ),
    "CONFIG_UNKNOWN_MODEL": CodeInfo(
        "Pass a Hugging Face id, a local model folder, or a preset from `backprop info --presets`; "
        "offline, only a folder (or a model already in the Hugging Face cache) loads."
    ),
    "CONFIG_RUN_ID_AMBIGUOUS": CodeInfo(
        "Several runs start with that id prefix; give more characters (`backprop runs list` shows the ids)."
    ),
    # INPUT_*: a file the user gave is missing or malformed.
    "INPUT_FILE_NOT_FOUND": CodeInfo("Check the path; relative paths start from the current folder."),
    "INPUT_FILE_UNREADABLE": CodeInfo(
        "Check that the path is a file (not a folder) and that this user may read it (ls -l; chmod a+r FILE)."
    ),
    "INPUT_DATASET_ENCODING_UNSUPPORTED": CodeInfo(
        "Convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8 in.jsonl > out.jsonl)."
    ),
    "INPUT_DATASET_PARSE_FAILED": CodeInfo(
        "Fix the listed lines (one JSON object per line), or pass --skip-invalid to skip them."
    ),
    "INPUT_DATASET_VALIDATION_FAILED": CodeInfo(
        "Each row needs a known shape (messages, conversations, instruction/output, text, "
        "chosen/rejected, completion/label); run `backprop validate FILE` for details."
    ),
    "INPUT_DATASET_TOO_FEW_ROWS": CodeInfo(
        "Each run needs at least 2 rows (one held out): give fewer --runs, a smaller --samples-per-run, or more rows."
    ),
    "INPUT_DATASET_MIXED_KINDS": CodeInfo(
        "Every run of a multi-run trains one adapter with one method: give all runs the same kind of rows "
        "(all chat/SFT, all preference pairs or all KTO rows)."
    ),
    "INPUT_DATASET_EMPTY": CodeInfo(
        "The file is empty (or only blank lines), or every row was dropped for the reasons listed; "
        "add rows, or fix the rows on the listed lines."
    ),
    "INPUT_TEMPLATE_RENDER_FAILED": CodeInfo(
        "The model's chat template rejected a row; check roles and their order in that row."
    ),
    "INPUT_CHAT_TEMPLATE_MISSING": CodeInfo(
        "The model has no chat template: choose one with --chat-template (chatml, llama3, or a Jinja file) "
        "(DataConfig.chat_template), or give raw `text` rows."
    ),
    "INPUT_TOKENIZER_LOAD_FAILED": CodeInfo(
        "The model folder needs a tokenizer.json (and tokenizer_config.json for chat models)."
    ),
    "INPUT_MODEL_LOAD_FAILED": CodeInfo("Check that the folder holds config.json and weights in safetensors."),
    "INPUT_ADAPTER_INVALID": CodeInfo(
        "The adapter folder needs adapter_config.json and adapter_model.safetensors as PEFT saves them, "
        "for the base model it names."
    ),
    "INPUT_UNSUPPORTED_ARCHITECTURE": CodeInfo(
        "GGUF export supports Llama 3.x, Mistral, Qwen2/2.5, Qwen3, Phi-3 and SmolLM3; "
        "export 'merged' or 'lora' for other models."
    ),
    "INPUT_PATH_OUTSIDE_WORKSPACE": CodeInfo(
        "The web UI reads and writes only inside its --workspace folder: give a path relative to it, "
        "without '..' and without links that lead out."
    ),
    "INPUT_UPLOAD_REJECTED": CodeInfo(
        "Upload a .jsonl, .json or .parquet file within the size limit (backprop ui --max-upload-mb)."
    ),
    "INPUT_CHAT_TEMPLATE_UNSUPPORTED": CodeInfo(
        "The chat template cannot be written as an Ollama template; the GGUF itself is fine and llama.cpp "
        "reads the template stored in it."
    ),
    "INPUT_HUB_REPO_NOT_FOUND": CodeInfo(
        "Check the repository id (user/name or org/name) and that your token may write to that namespace."
    ),
    # DEP_*: something outside the package is missing or unreachable.
    "DEP_MISSING_PACKAGE": CodeInfo("Install the extra named in the message, e.g. pip install 'backpropagate[qlora]'."),
    "DEP_GPU_NOT_AVAILABLE": CodeInfo("This mode needs an NVIDIA GPU; use mode='lora' on CPU or run on a GPU machine."),
    "DEP_OLLAMA_REGISTRATION_FAILED": CodeInfo(
        "Start Ollama (`ollama serve`) and rerun, or run the `ollama create` command printed above.",
        retryable=True,
    ),
    "DEP_LLAMA_CPP_UNAVAILABLE": CodeInfo("Install llama.cpp bindings: pip install 'backpropagate[llama]'."),
    "DEP_HUB_AUTH_FAILED": CodeInfo(
        "Set HF_TOKEN to a token with write access (huggingface.co/settings/tokens) or run `hf auth login`."
    ),
    "DEP_HUB_UNREACHABLE": CodeInfo(
        "Check the network (and HF_ENDPOINT, HF_HUB_OFFLINE), then rerun; the export on disk is complete.",
        retryable=True,
    ),
    "DEP_MLX_UNAVAILABLE": CodeInfo(
        "Install MLX: pip install 'backpropagate[mlx]' (mlx-lm[cpu] on Linux), or use backend='torch'."
    ),
    # RUNTIME_*: the run itself failed.
    "RUNTIME_IO_FAILED": CodeInfo("Check free disk space and permissions of the output folder.", retryable=True),
    "RUNTIME_OOM_RECOVERY_EXHAUSTED": CodeInfo(
        "Even micro-batch 1 ran out of memory: lower max_seq_length, use QLoRA, or enable gradient checkpointing; `backprop estimate-memory` shows the longest context that fits."
    ),
    "RUNTIME_FULL_FT_MODEL_TOO_LARGE": CodeInfo(
        "Full fine-tuning is limited to models of about 4B parameters; use mode='lora' or 'qlora', or a smaller preset."
    ),
    "RUNTIME_GPU_TEMPERATURE_CRITICAL": CodeInfo(
        "The GPU stayed too hot for too long; improve cooling or raise --max-gpu-temp.", retryable=True
    ),
    "RUNTIME_TRAINING_DIVERGED": CodeInfo("The loss became NaN or infinite; lower the learning rate."),
    "RUNTIME_KERNEL_COMPILE_FAILED": CodeInfo(
        "A compiled attention kernel failed to build with this torch and Triton, so the run stopped rather than "
        "recompute with another kernel. Use another torch / Triton release (`backprop info` lists them) and "
        "resume with --resume."
    ),
    "RUNTIME_GGUF_EXPORT_FAILED": CodeInfo("The export did not complete; nothing was written under the final name."),
    "RUNTIME_INTERRUPTED": CodeInfo(
        "The run was interrupted (Ctrl-C); `backprop train ... --resume` continues it from its last checkpoint.",
        retryable=True,
    ),
    "RUNTIME_TERMINATED": CodeInfo(
        "The run was stopped by SIGTERM after a checkpoint; `backprop train ... --resume` continues it.",
        retryable=True,
    ),
    "RUNTIME_DISTRIBUTED_FAILED": CodeInfo(
        "A training process of a several-device run failed or hung; its own error, named in the message, says why. "
        "Fix that and run again (--resume continues from the last checkpoint).",
        retryable=True,
    ),
    "RUNTIME_UI_AUTH_NOT_ENFORCED": CodeInfo(
        "Listening beyond this machine needs a login: pass --auth user:password or --auth-file FILE, "
        "or keep the default --host 127.0.0.1."
    ),
    "RUNTIME_EVAL_REGRESSION": CodeInfo(
        "The held-out loss is worse than the one it was gated against by more than --max-regression; "
        "compare the two with `backprop eval RUN --vs OTHER`."
    ),
    # STATE_*: files left by an earlier run are missing, stale or in the way.
    "STATE_CHECKPOINT_NOT_FOUND": CodeInfo(
        "No checkpoint to resume from in the output folder; start without --resume."
    ),
    "STATE_CHECKPOINT_INVALID": CodeInfo("The checkpoint is unreadable; resume from an earlier one or start again."),
    "STATE_MULTI_RUN_NOT_FOUND": CodeInfo(
        "No multi_run.json in the output folder: start the multi-run without --resume, or name its folder."
    ),
    "STATE_OUTPUT_EXISTS": CodeInfo("The output already exists; pass --force to overwrite it or choose another path."),
    "STATE_RUN_HISTORY_UNAVAILABLE": CodeInfo(
        "The run history database (runs.db under the cache folder) is damaged or locked; move it aside to start a "
        "new history (training never depends on it).",
        retryable=True,
    ),
    "STATE_RUN_NOT_FOUND": CodeInfo("No run in the history has that id; `backprop runs list` shows the recorded runs."),
    "STATE_RUN_OUTPUT_MISSING": CodeInfo(
        "The run has no finished adapter or model folder (it failed, was interrupted, or its files were removed)."
    ),
    "STATE_CACHE_CORRUPT": CodeInfo("Delete the dataset cache folder named in the message and rerun.", retryable=True),
}

FAMILY_EXIT = {
    "CONFIG": EXIT_USAGE,
    "INPUT": EXIT_BAD_INPUT,
    "DEP": EXIT_DEPENDENCY,
    "RUNTIME": EXIT_RUNTIME,
    "STATE": EXIT_STATE,
}


class BackpropagateError(Exception):
    """Base of every error this package raises on purpose.

    Args:
        code: A code from `CATALOG`; its family prefix must match the class.
        message: What went wrong, naming the file, line or setting involved.
        hint: Overrides the catalog's hint when the message needs a specific way out.
    """

    family = ""

    def __init__(self, code: str, message: str, *, hint: str | None = None) -> None:
        if code not in CATALOG:
            raise ValueError(f"unknown error code {code!r}")
        if self.family and not code.startswith(self.family + "_"):
            raise ValueError(f"{code} does not belong to {type(self).__name__}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint or CATALOG[code].hint
        self.retryable = CATALOG[code].retryable

    @property
    def exit_status(self) -> int:
        """Process exit status for this error's family."""
        if self.code == "RUNTIME_INTERRUPTED":
            return EXIT_INTERRUPTED
        if self.code == "RUNTIME_TERMINATED":
            return EXIT_TERMINATED
        return FAMILY_EXIT[self.code.split("_", 1)[0]]

    def __str__(self) -> str:
        return f"[{self.code}]: {self.message}"

    def to_dict(self) -> dict[str, object]:
        """The error as JSON outputs print it (`--log-format json`, `--json` reports)."""
        return {
            "level": "error",
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
            "retryable": self.retryable,
            "exit_status": self.exit_status,
        }


class ConfigError(BackpropagateError, ValueError):
    """A setting is invalid."""

    family = "CONFIG"


class InputError(BackpropagateError, ValueError):
    """A user-supplied file is missing or malformed."""

    family = "INPUT"


class DependencyError(BackpropagateError, ImportError):
    """A package, device or service the operation needs is unavailable."""

    family = "DEP"


class RunFailedError(BackpropagateError, RuntimeError):
    """The run failed while working."""

    family = "RUNTIME"


class StateError(BackpropagateError):
    """Files from an earlier run are missing, stale or in the way."""

    family = "STATE"


_BY_FAMILY: dict[str, type[BackpropagateError]] = {
    cls.family: cls for cls in (ConfigError, InputError, DependencyError, RunFailedError, StateError)
}


def from_code(code: str, message: str) -> BackpropagateError:
    """Builds the exception of the right family for `code` (used by the Rust core)."""
    return _BY_FAMILY[code.split("_", 1)[0]](code, message)
