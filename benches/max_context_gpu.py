"""The longest context that trains on one card: ours against transformers + peft + bitsandbytes.

Llama 3.1 8B's shape with random weights (memory does not depend on weight values), QLoRA
(nf4, double quantization) with rank 32 on every linear layer, batch 1, one sequence per
step. For each card cap (`torch.cuda.set_per_process_memory_fraction`) and each system, the
search grows the length from its start (ours: estimate-memory's prediction for the cap) until
a trial fails, then bisects to `--precision` (5%). A trial trains two optimizer steps in a
row (forward, backward, optimizer step) in a fresh subprocess (an out-of-memory error cannot
poison the next trial) under a time limit; it reports tokens/s of its second step and the
peak memory allocated.

  ours  the real training loop (`train.torch.loop.train`) with its defaults on CUDA:
        recompute planner, activation offload `auto`, MLP in token slices, chunked loss
  peer  transformers + peft + bitsandbytes nf4 (peft's kbit preparation), gradient
        checkpointing (non-reentrant), SDPA attention, the model's own loss

Caps are searched from small to large and what a trial showed is reused: a length that
trained under a smaller cap trains under a larger one, and one that ran out of memory under
a larger cap does so under a smaller one. `--budget-s` bounds the whole run; each search
gets an equal share of what is left, and a search cut short reports "≥ X". Ours also trains
4 x 2048 tokens per step once (`--reference-rows`), the speed its long-context tokens/s are
compared with. Every found length is set against `estimate-memory`'s prediction.

With several GPUs (`--gpus`, default all visible) the searches run at once, one queue of them
per GPU (CUDA_VISIBLE_DEVICES per trial): on 8 GPUs every search and the reference get the
whole budget. Timings from concurrent trials share the host (CPU, PCIe, host memory).

Each trial and each search result is appended as a JSON line to
benches/results/max_context_<card>.jsonl (and to $OUT/ when set, once if that is the same
folder); one table is printed at the end. An installed package (PYTHONPATH) is imported before
this tree's python/, whose compiled core may not be built.

  PYTHONPATH=/tmp/site python benches/max_context_gpu.py   # on the GPU, the wheel installed in /tmp/site
  python benches/max_context_gpu.py --shape tiny --max-trials 3                  # smoke test (CPU)

The random 4-bit model is built on the meta device and each linear layer is quantized on
the device from a random bf16 matrix, one at a time, so no 16 GB host copy is ever made.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHAPES: dict[str, dict[str, Any]] = {
    "llama8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        rope_theta=10000.0,
    ),
}
LORA_R = 32
RESULT = "RESULT "
# A trial's child prints one of these per finished step, so a trial cut off by time still says how far it got.
PROGRESS = "PROGRESS "
_WRITING = threading.Lock()
# Lengths are multiples of this (bisection steps too).
GRAIN = 256


def make_config(shape: str) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], max_position_embeddings=1 << 21, tie_word_embeddings=False)


def random_model(shape: str, device: Any, nf4: bool = True) -> Any:
    """A causal LM of `shape` with random weights, its decoder's linear layers in bitsandbytes nf4 or bf16."""
    import torch
    from transformers import AutoModelForCausalLM

    config = make_config(shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    gen = torch.Generator(device).manual_seed(0)
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                dense = torch.randn(child.out_features, child.in_features, generator=gen, device=device)
                dense = (dense * 0.02).to(torch.bfloat16)
                if nf4:
                    setattr(parent, name, nf4_linear(dense, device))
                else:
                    child.weight = torch.nn.Parameter(dense, requires_grad=False)
                del dense
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            if "norm" in type(module).__name__.lower():
                value = torch.ones(param.shape, dtype=torch.bfloat16, device=device)
            else:
                value = (torch.randn(param.shape, generator=gen, device=device) * 0.02).to(torch.bfloat16)
            setattr(module, name, torch.nn.Parameter(value, requires_grad=False))
    with torch.device(device):  # its inverse frequencies are computed, not loaded
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    model.lm_head.weight.requires_grad_(False)
    return model


def nf4_linear(dense: Any, device: Any) -> Any:
    """A bitsandbytes nf4 layer (double quantization, blocks of 64) holding `dense`, quantized on the device."""
    import bitsandbytes as bnb
    import torch

    out_features, in_features = dense.shape
    quantized = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=False,
        compute_dtype=torch.bfloat16,
        quant_type="nf4",
        compress_statistics=True,
        device="meta",
    )
    packed: Any = bnb.nn.Params4bit(
        dense, requires_grad=False, quant_type="nf4", compress_statistics=True, blocksize=64
    )
    quantized.weight = packed.to(device)  # quantizes on the way
    return quantized


def cap_memory(cap_gib: float, device: Any) -> None:
    """Lets this process's allocator hand out at most `cap_gib` GiB (CUDA)."""
    import torch

    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total), device)


def is_oom(exc: BaseException) -> bool:
    """Out of card memory, or of host memory (offloaded activations live there)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError) or getattr(exc, "code", "") == "RUNTIME_OOM_RECOVERY_EXHAUSTED":
        return True
    return isinstance(exc, (MemoryError, RuntimeError)) and "can't allocate memory" in str(exc)


def trial_ours(
    shape: str,
    length: int,
    rows: int,
    device: Any,
    mode: str = "qlora",
    checkpointing: str = "auto",
    offload: str = "auto",
    steps: int = 2,
) -> dict[str, Any]:
    """`steps` steps of the real training loop on one packed row of `length` tokens (`rows` samples in it).

    `mode` is qlora or lora (bf16 base); `checkpointing` and `offload` are the loop's
    gradient_checkpointing and offload_activations settings (the defaults: auto). Tokens/s is
    the last step's.
    """
    import torch

    # One compiled kernel for every length: a fresh process per trial would otherwise compile each length anew.
    torch._dynamo.config.assume_static_by_default = False
    sys.path.insert(0, str(ROOT / "tests"))
    import synthetic_data
    from backpropagate.config import TrainConfig
    from backpropagate.train.torch import loading
    from backpropagate.train.torch import loop as torch_loop

    config = TrainConfig(
        mode=mode,
        device=str(device),
        gradient_checkpointing=checkpointing,
        offload_activations=offload,
        lora_r=LORA_R,
        lora_alpha=LORA_R,
        lora_dropout=0.0,
        target_modules="all-linear",
        learning_rate=1e-4,
        micro_batch=1,
        grad_accumulation=1,
        warmup_steps=0,
        save_every=0,
        progress=False,
        report_to="none",
    ).validate()
    model = random_model(shape, device, nf4=mode == "qlora")
    params = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())
    tm = loading.prepare_for_training(model, config, mode, device, params)
    dataset = synthetic_data.random_dataset([length // rows] * (steps * rows), SHAPES[shape]["vocab_size"], length)
    with tempfile.TemporaryDirectory(prefix="bp-maxctx-") as tmp:
        metrics = Path(tmp) / "metrics.jsonl"
        done = threading.Event()
        watcher = threading.Thread(target=report_steps, args=(metrics, device, done), daemon=True)
        watcher.start()
        try:
            outcome = torch_loop.train(tm, dataset, config, steps, Path(tmp), "max-context", {}, 1)
        finally:
            done.set()
            watcher.join()
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {"tokens_per_s": records[-1]["tokens_per_s"], "features": outcome.features}


def report_steps(metrics: Path, device: Any, done: threading.Event, every_s: float = 1.0) -> None:
    """Prints a PROGRESS line for each step the loop appends to `metrics` (step, tokens/s, peak so far) until `done`."""
    import torch

    started, seen = time.perf_counter(), 0
    while True:
        finished = done.wait(every_s)
        lines = metrics.read_text().split("\n")[:-1] if metrics.exists() else []  # whole lines only
        for line in lines[seen:]:
            record = json.loads(line)
            progress = {"step": record["step"], "tokens_per_s": record.get("tokens_per_s")}
            progress["elapsed_s"] = round(time.perf_counter() - started, 1)
            if device.type == "cuda":
                progress["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            print(PROGRESS + json.dumps(progress), flush=True)
        seen = len(lines)
        if finished:
            return


def trial_peer(shape: str, length: int, rows: int, device: Any, steps: int = 2) -> dict[str, Any]:
    """`steps` steps of a standard transformers + peft QLoRA recipe on `length` tokens (tokens/s: the last one's)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = random_model(shape, device)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # fp32 norms, head
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_R, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (rows, length // rows), device=device)
    step_s = 0.0
    for _ in range(steps):
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_s = time.perf_counter() - started
    return {"tokens_per_s": round(length / step_s, 1), "features": ["transformers+peft+bnb", "sdpa", "ckpt"]}


def trial_main(args: argparse.Namespace) -> int:
    """Child process: one trial, its outcome as the last stdout line."""
    import torch

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    cap_memory(args.cap, device)
    started = time.perf_counter()
    outcome: dict[str, Any] = {"ok": True}
    try:
        if args.trial == "ours":
            outcome.update(trial_ours(args.shape, args.length, args.rows, device, steps=args.steps))
        else:
            outcome.update(trial_peer(args.shape, args.length, args.rows, device, steps=args.steps))
    except Exception as exc:  # an out-of-memory error is the answer; anything else ends the search
        outcome = {"ok": False, "oom": is_oom(exc), "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    outcome["wall_s"] = round(time.perf_counter() - started, 1)
    if device.type == "cuda":
        outcome["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(RESULT + json.dumps(outcome), flush=True)
    return 0


@dataclass
class Trials:
    """Runs trials in subprocesses within a global time and count budget; remembers what each showed."""

    args: argparse.Namespace
    card: str
    deadline: float
    done: list[dict[str, Any]] = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def exhausted(self) -> bool:
        return self.left() < 5 or (self.args.max_trials > 0 and self.count >= self.args.max_trials)

    @property
    def count(self) -> int:
        """Search trials run (one sequence per step); the reference's rows of 2048 do not count."""
        return sum(1 for t in self.done if not t.get("reused") and t["rows"] == 1)

    def known(self, which: str, cap: float, length: int, rows: int) -> dict[str, Any] | None:
        """A result implied by an earlier trial (monotonic in the cap), if any."""
        for t in self.done:
            if t["which"] != which or t["length"] != length or t["rows"] != rows or t.get("reused"):
                continue
            if (t["ok"] and t["cap_gib"] <= cap) or (t.get("oom") and t["cap_gib"] >= cap):
                return {**t, "cap_gib": cap, "reused": True}
        return None

    def run(self, which: str, cap: float, length: int, rows: int, limit_s: float, gpu: int | None) -> dict[str, Any]:
        """One trial on GPU `gpu` (None: as the environment has it) in a child process, or what is known of it."""
        known = self.known(which, cap, length, rows)
        if known is not None:
            self.done.append(known)
            return known
        command = [sys.executable, str(Path(__file__).resolve()), "--trial", which, "--shape", self.args.shape]
        command += ["--cap", str(cap), "--length", str(length), "--rows", str(rows), "--steps", str(self.args.steps)]
        outcome = run_child(command, max(1.0, min(limit_s, self.args.trial_timeout_s, self.left())), gpu)
        record = {"kind": "trial", "which": which, "shape": self.args.shape, "card": self.card, "cap_gib": cap}
        record.update({"length": length, "rows": rows, "steps": self.args.steps, "gpu": gpu, **outcome})
        if record["ok"] and which == "ours":
            record["estimate_gib"] = estimated_gib(self.args.shape, length, record.get("features", []))
        self.done.append(record)
        emit(record, self.args, self.card)
        print(
            f"  {which:<4} cap {cap:>4} GiB  {length:>8} tokens: "
            + (
                f"ok, {record['tokens_per_s']} tok/s, peak {record.get('peak_gib')} GiB"
                if record["ok"]
                else record["error"][:160]
            ),
            flush=True,
        )
        return record


def run_child(command: list[str], timeout: float, gpu: int | None = None) -> dict[str, Any]:
    """Runs one trial's child process on GPU `gpu` (None: as the environment has it); the outcome it printed, or why none.

    Each step the child reports is echoed as it comes, so a trial of several minutes a step
    shows its progress in the log while it runs.
    """
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    # An installed package (PYTHONPATH) comes before the source tree, whose compiled core may not be built.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT / "python")]))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.append(proc.stderr.read() if proc.stderr else ""), daemon=True)
    reader.start()
    expired = threading.Event()
    timer = threading.Timer(timeout, lambda: (expired.set(), proc.kill()))
    timer.start()
    stdout = []
    assert proc.stdout is not None
    for line in proc.stdout:
        stdout.append(line)
        if line.startswith(PROGRESS):
            step = json.loads(line[len(PROGRESS) :])
            print(
                f"    step {step['step']}: {step.get('tokens_per_s')} tok/s, peak {step.get('peak_gib')} GiB, "
                f"{step['elapsed_s']} s",
                flush=True,
            )
    proc.wait()
    timer.cancel()
    reader.join()
    if expired.is_set():
        return cut_off("".join(stdout), timeout)
    lines = [line for line in stdout if line.startswith(RESULT)]
    if lines:
        outcome: dict[str, Any] = json.loads(lines[-1][len(RESULT) :])
        return outcome
    if proc.returncode == -9:  # the kernel's OOM killer: host memory ran out
        return {"ok": False, "oom": True, "error": "killed (host memory exhausted)"}
    return {"ok": False, "oom": False, "error": f"exit {proc.returncode}: {''.join(stderr)[-400:]}"}


def cut_off(text: str, timeout: float) -> dict[str, Any]:
    """The outcome of a trial stopped after `timeout` s: not a result, but the steps it finished (its PROGRESS lines)."""
    steps = [json.loads(line[len(PROGRESS) :]) for line in text.splitlines() if line.startswith(PROGRESS)]
    outcome: dict[str, Any] = {"ok": False, "oom": False, "timeout": True, "steps_done": len(steps)}
    outcome["error"] = f"no result in {timeout:.0f} s"
    if steps:
        last = steps[-1]
        outcome.update(last_step=last, peak_gib=last.get("peak_gib"))
        outcome["error"] += f" ({len(steps)} step(s) done, the last at {last['tokens_per_s']} tok/s)"
    return outcome


def estimate_allocated(shape: str, length: int, mode: str, offload: bool) -> dict[str, int]:
    """`estimate-memory`'s parts for a trial's setting, less its allocator margin (a trial reports allocated bytes)."""
    from backpropagate.memory_estimate import estimate_memory

    estimate = estimate_memory(SHAPES[shape], length, mode=mode, lora_r=LORA_R, offload=offload)
    return {part: size for part, size in estimate.parts.items() if part != "margin"}


def estimated_gib(shape: str, length: int, features: list[str]) -> float | None:
    """`estimate_allocated` in GiB for one of ours' QLoRA trials (offload as its features say).

    None where the recompute planner kept layers (features `recompute[k/n]` with k < n): it
    spends the room a cap leaves on purpose, which the estimate of a step that recomputes every
    layer does not model. An offloaded trial (`+offload[m/n]`, `+replay[r/n]`) is estimated
    with the card holding the inputs the planner left there, n - m - r, or those of its longest
    segment of replayed layers where that is more, where the estimate holds one.
    """
    recompute = next((f for f in features if f.startswith("recompute[")), "recompute[0/1]")
    recomputed, layers = recompute.removeprefix("recompute[").split("]")[0].split("/")
    if recomputed != layers:
        return None
    from backpropagate.memory_estimate import input_bytes

    def count(lever: str) -> int:
        return int(recompute.split(f"+{lever}[")[1].split("/")[0]) if f"+{lever}[" in recompute else 0

    offload = "+offload[" in recompute
    allocated = sum(estimate_allocated(shape, length, "qlora", offload).values())
    if offload:
        on_host, replayed = count("offload"), count("replay")
        every = -(-(on_host + replayed) // on_host)
        on_card = int(layers) - on_host - replayed
        allocated += (max(on_card, every) - 1) * input_bytes(SHAPES[shape], length, 2)
    return round(allocated / 2**30, 2)


def first_length(args: argparse.Namespace, which: str, cap: float) -> tuple[int, float]:
    """Where a search starts and by what factor it steps.

    With `--start auto`, ours starts at estimate-memory's longest context for the cap and steps
    by 1.25 (a good estimate leaves two or three trials, each of them long); the peer starts at
    4096 and doubles. A number starts both there, doubling.
    """
    if args.start != "auto":
        return int(args.start), 2.0
    if which == "peer":
        return 4096, 2.0
    from backpropagate.memory_estimate import Shape, longest_context

    predicted = longest_context(Shape.of(make_config(args.shape).to_dict()), "qlora", LORA_R, cap)
    return max(GRAIN, predicted // GRAIN * GRAIN), 1.25


def search(
    trials: Trials, which: str, cap: float, share_s: float, share_trials: int, gpu: int | None
) -> dict[str, Any]:
    """Growing from the start, then bisection to --precision; the longest length that trained, and how sure.

    It stops after `share_s` seconds or `share_trials` trials (0 = no limit), whichever comes first,
    and before a trial longer than one that trained when less time is left than that one took
    (a longer trial cannot take less: it would only be cut off).
    """
    until = time.monotonic() + share_s
    last_trial = trials.count + share_trials if share_trials else None

    def out_of_budget() -> bool:
        left = until - time.monotonic()
        return (
            trials.exhausted()
            or left <= 0
            or (last_trial is not None and trials.count >= last_trial)
            or (best is not None and left < float(best.get("wall_s") or 0))
        )

    best: dict[str, Any] | None = None
    failed_at: int | None = None
    stopped = ""
    length, factor = first_length(trials.args, which, cap)
    # Growing while trials train; if even the start does not fit, shrinking instead.
    while True:
        if out_of_budget():
            stopped = "budget"
            break
        result = trials.run(which, cap, length, 1, until - time.monotonic(), gpu)
        if result["ok"]:
            best, length = result, int(length * factor) // GRAIN * GRAIN
            if failed_at is not None:
                break
        elif result.get("oom"):
            failed_at = length
            if best is not None or length <= GRAIN:
                break
            length = max(GRAIN, int(length / factor) // GRAIN * GRAIN)
        else:
            stopped = "timeout" if result.get("timeout") else "error"
            break
    while failed_at is not None and best is not None and not stopped:
        low = best["length"]
        if failed_at - low <= max(GRAIN, trials.args.precision * low):
            break
        if out_of_budget():
            stopped = "budget"
            break
        mid = (low + failed_at) // 2 // GRAIN * GRAIN
        result = trials.run(which, cap, mid, 1, until - time.monotonic(), gpu)
        if result["ok"]:
            best = result
        elif result.get("oom"):
            failed_at = mid
        else:
            stopped = "timeout" if result.get("timeout") else "error"
    found = {
        "kind": "search",
        "which": which,
        "shape": trials.args.shape,
        "card": trials.card,
        "cap_gib": cap,
        "max_length": best["length"] if best else 0,
        "at_least": bool(stopped) or failed_at is None,
        "stopped": stopped or None,
        "failed_at": failed_at,
        "tokens_per_s": best.get("tokens_per_s") if best else None,
        "peak_gib": best.get("peak_gib") if best else None,
        "estimate_gib": best.get("estimate_gib") if best else None,
        "features": best.get("features") if best else None,
    }
    emit(found, trials.args, trials.card)
    return found


def gpu_count(args: argparse.Namespace) -> int:
    """GPUs to spread the searches over: --gpus, else all visible ones (1 on a CPU machine)."""
    if args.gpus:
        return int(args.gpus)
    import torch

    return max(1, torch.cuda.device_count())


def card_name() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    return next((n for n in ("h200", "h100", "a100", "l40s", "4090") if n in name), name.split()[-1])


def emit(record: dict[str, Any], args: argparse.Namespace, card: str, bench: str = "max_context") -> None:
    """Appends `record` to the bench's results file, `<bench>_<card>.jsonl` (and to $OUT/ when set)."""
    line = json.dumps({**record, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    folders = [Path(args.results_dir)] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    with _WRITING:  # searches on several GPUs write from several threads
        for folder in dict.fromkeys(f.resolve() for f in folders):  # once, when results-dir is $OUT
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"{bench}_{card}.jsonl", "a") as f:
                f.write(line + "\n")


def table(found: list[dict[str, Any]], reference: dict[str, Any] | None, done: list[dict[str, Any]]) -> str:
    """One row per (cap, system): longest length, its speed and memory, the estimate, ours / peer.

    Then per cap, ours' speed at the longest length it trained that the peer also reached.
    """
    ref_tps = reference["tokens_per_s"] if reference and reference.get("ok") else None
    lines = [
        f"reference (ours, 4 x 2048 tokens per step): {ref_tps or 'n/a'} tok/s",
        f"{'cap':>5} {'system':<6} {'max tokens':>12} {'tok/s':>9} {'vs ref':>7} {'peak GiB':>9} "
        f"{'est GiB':>8} {'est err':>8} {'x peer':>7}",
    ]
    peer = {f["cap_gib"]: f for f in found if f["which"] == "peer"}
    for f in found:
        length = ("≥ " if f["at_least"] else "") + f"{f['max_length']:,}"
        tps = f["tokens_per_s"]
        vs_ref = f"{tps / ref_tps:.2f}" if tps and ref_tps and f["which"] == "ours" else "-"
        est, peak = f.get("estimate_gib"), f.get("peak_gib")
        err = f"{(est - peak) / peak:+.0%}" if est and peak else "-"
        other = peer.get(f["cap_gib"])
        ratio = (
            f"{f['max_length'] / other['max_length']:.1f}"
            if f["which"] == "ours" and other and other["max_length"]
            else "-"
        )
        lines.append(
            f"{f['cap_gib']:>5} {f['which']:<6} {length:>12} {tps or '-':>9} {vs_ref:>7} {peak or '-':>9} "
            f"{est or '-':>8} {err:>8} {ratio:>7}"
        )
    for cap, other in peer.items():
        shared = [t for t in done if t["which"] == "ours" and t["ok"] and t["rows"] == 1]
        shared = [t for t in shared if t["cap_gib"] == cap and t["length"] <= other["max_length"]]
        if shared and ref_tps:
            t = max(shared, key=lambda t: t["length"])
            lines.append(
                f"cap {cap} GiB: ours at {t['length']:,} tokens (peer's longest {other['max_length']:,}): "
                f"{t['tokens_per_s']} tok/s, {t['tokens_per_s'] / ref_tps:.2f} x its 4 x 2048 speed"
            )
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama8b")
    p.add_argument("--caps", default="16,24,80", help="Card sizes in GiB, comma-separated.")
    p.add_argument("--which", default="peer,ours", help="Systems to search: ours, peer or both.")
    p.add_argument("--budget-s", type=float, default=540.0, help="Wall-clock budget of the whole run.")
    p.add_argument("--trial-timeout-s", type=float, default=240.0, help="Longest a single trial may run.")
    p.add_argument("--max-trials", type=int, default=0, help="Stop after this many search trials (0 = no limit).")
    p.add_argument("--start", default="auto", help="First length of each search, or auto (see first_length).")
    p.add_argument("--precision", type=float, default=0.05, help="Bisection stops within this share.")
    p.add_argument("--reference-rows", type=int, default=4, help="Ours' speed reference: rows of 2048 (0 = none).")
    p.add_argument("--gpus", type=int, default=0, help="Run searches on this many GPUs at once (0 = all).")
    p.add_argument(
        "--steps",
        type=int,
        default=2,
        help="Optimizer steps per trial (at least 2); tokens/s is the last one's. Ours plans its kept layers "
        "after step 1 and captures its CUDA graph in step 2, so a steady speed needs 3 or more.",
    )
    p.add_argument("--results-dir", default=str(ROOT / "benches" / "results"), help="Where the JSON lines go.")
    # A single trial, run by the search in a child process.
    p.add_argument("--trial", choices=("ours", "peer"), help=argparse.SUPPRESS)
    p.add_argument("--cap", type=float, default=80.0, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=4096, help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.which.split(",")) - {"ours", "peer"}
    if unknown:
        p.error(f"--which: unknown system(s) {', '.join(sorted(unknown))}")
    if args.steps < 2:
        p.error("--steps: a trial trains at least two steps in a row")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    sys.path.append(str(ROOT / "python"))  # a source tree without an install (PYTHONPATH comes first)
    if args.trial:
        return trial_main(args)
    started = time.monotonic()
    trials = Trials(args, card_name(), started + args.budget_s)
    caps = sorted(float(c) if "." in c else int(c) for c in args.caps.split(","))
    systems = [w for w in ("peer", "ours") if w in args.which.split(",")]
    print(f"max context: {args.shape} QLoRA r{LORA_R}, caps {caps} GiB, {', '.join(systems)}", flush=True)
    searches: list[tuple[str, Any]] = [(which, cap) for which in systems for cap in caps]
    reference_item = ("reference", max(caps)) if "ours" in systems and args.reference_rows > 0 else None
    gpus = gpu_count(args)
    # Consecutive searches share a GPU (so a system's caps reuse each other's trials); the reference
    # runs first on the queue of ours' largest cap, or on a GPU of its own when there are enough.
    queues: list[list[tuple[str, Any]]] = [[] for _ in range(max(1, min(gpus, len(searches) + 1)))]
    own = reference_item is not None and len(queues) > len(searches)
    spread = len(queues) - own
    for i, item in enumerate(searches):
        queues[i * spread // len(searches)].append(item)
    if reference_item is not None:
        queues[-1].insert(len(queues[-1]) if own else 0, reference_item)
    results: dict[tuple[str, Any], dict[str, Any]] = {}

    def work(queue: list[tuple[str, Any]], gpu: int | None) -> None:
        for i, (which, cap) in enumerate(queue):
            left = len(queue) - i
            if which == "reference":
                length = 2048 * args.reference_rows
                results[(which, cap)] = trials.run("ours", cap, length, args.reference_rows, trials.left(), gpu)
                continue
            share = max(0.0, trials.left()) / left
            share_trials = max(1, (args.max_trials - trials.count) // left) if args.max_trials else 0
            results[(which, cap)] = search(trials, which, cap, share, share_trials, gpu)

    threads = [threading.Thread(target=work, args=(queue, i if gpus > 1 else None)) for i, queue in enumerate(queues)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    reference = results.pop(reference_item, None) if reference_item else None
    found = [results[item] for item in searches if item in results]
    print(table(found, reference, trials.done), flush=True)
    print(f"{trials.count} trials in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
