"""Our MLX rail against mlx-lm's own LoRA trainer (`mlx_lm.tuner.trainer.train`, what `mlx_lm lora` runs).

Same model (the real SmolLM2-135M by default), same conversations (the example chat data at
their natural lengths, one epoch each), same LoRA (rank 8, alpha 16, every linear layer of
every block, no dropout), AdamW at a constant learning rate without weight decay or clipping,
fp32 weights on both sides (our CPU rule; mlx-lm would keep the folder's bf16), on this
machine's CPU. Each run is its own subprocess; rounds alternate which side goes first, under
each MLX compile setting asked for (`default`: mlx-lm compiles its step, ours runs eagerly;
`off`: MLX_DISABLE_COMPILE=1, neither compiles), and the report gives medians and the ratio.

Tokens/s counts the conversations' real tokens (no padding) over the training loop's wall
time (model loading and data preparation excluded on both sides), and over the process's CPU
time from loading the model to the saved adapter on both sides, which other work on a shared
machine disturbs less. Peak memory is MLX's peak allocation during training and the process's
max RSS.

    .venv/bin/python benches/mlx_cpu.py --rounds 2 --conversations 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHAT = REPO / "python/backpropagate/examples/chat.jsonl"
LORA_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"] + [
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
COMPILE_ENV = {"default": None, "off": "1"}  # MLX_DISABLE_COMPILE per setting
HIDDEN = ("worker", "data", "json", "model")  # arguments not reported as settings


def conversations(batch_size: int, limit: int | None) -> list[dict]:
    """The example chat rows in `messages` form (what mlx-lm reads), the first `limit`, cut to a multiple of
    the batch size (mlx-lm drops a short batch)."""
    examples = [json.loads(line) for line in CHAT.read_text().splitlines() if line.strip()]
    data = [r for r in examples if "messages" in r][:limit]
    return data[: len(data) // batch_size * batch_size]


def cpu_seconds() -> float:
    """User + system CPU time of this process and its children (mlx's compiler runs) so far."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def peaks() -> dict:
    import mlx.core as mx

    return {
        "peak_gib": round(mx.get_peak_memory() / 2**30, 3),
        "max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }


def worker_ours(model: Path, data: Path, args: argparse.Namespace, out: Path) -> dict:
    from backpropagate import Trainer
    from backpropagate.data import DataConfig, prepare

    trainer = Trainer(
        str(model),
        backend="mlx",
        mode="lora",
        lora_r=8,
        lora_alpha=16.0,
        lora_dropout=0.0,
        target_modules="all-linear",
        micro_batch=1,
        grad_accumulation=1,
        learning_rate=1e-4,
        schedule="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        max_seq_length=args.max_seq_length,
        save_every=0,
        progress=False,
        report_to="none",
        output_dir=str(out),
    )
    prepared = prepare(data, model, DataConfig(max_seq_length=args.max_seq_length))  # mlx-lm's also precedes timing
    cpu = cpu_seconds()
    result = trainer.train(prepared, epochs=1)  # loads the model, trains, saves the adapter
    cpu = cpu_seconds() - cpu
    return {
        "seconds": result.duration_s,
        "cpu_s": cpu,
        "tokens": result.tokens_seen,
        "steps": result.steps,
        **peaks(),
    }


def worker_theirs(model: Path, data: Path, args: argparse.Namespace, out: Path) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    from backpropagate.train.mlx.model import mlx_config

    cpu = cpu_seconds()
    net, tokenizer = load(str(model), model_config=mlx_config(model))
    net.set_dtype(mx.float32)  # as ours on the CPU (mlx-lm keeps the folder's dtype)
    net.freeze()
    lora = {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": LORA_KEYS}  # scale = alpha / rank, as ours
    linear_to_lora_layers(net, len(net.layers), lora)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = CacheDataset(ChatDataset(rows, tokenizer, mask_prompt=True))
    iters = len(dataset) // args.batch_size
    tokens = sum(len(dataset[i][0]) for i in range(len(dataset)))
    settings = TrainingArgs(
        batch_size=args.batch_size,
        iters=iters,
        steps_per_report=iters,
        steps_per_save=10**9,
        max_seq_length=args.max_seq_length,
        adapter_file=str(out / "adapters.safetensors"),
    )
    out.mkdir(parents=True, exist_ok=True)
    mx.reset_peak_memory()  # as ours: the peak of training, not of loading
    started = time.perf_counter()
    train(net, optim.AdamW(learning_rate=1e-4, weight_decay=0.0), dataset, None, args=settings)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu  # train() saves the adapter at the end
    return {"seconds": seconds, "cpu_s": cpu, "tokens": tokens, "steps": iters, **peaks()}


def run_side(side: str, model: Path, data: Path, args: argparse.Namespace, compile_setting: str) -> dict:
    """One training run in a fresh subprocess under one MLX compile setting."""
    command = [sys.executable, __file__, "--worker", side, "--model", str(model), "--data", str(data)]
    length = args.row_length if side == "ours" and args.row_length else args.max_seq_length
    command += ["--batch-size", str(args.batch_size), "--max-seq-length", str(length)]
    env = {k: v for k, v in os.environ.items() if k != "MLX_DISABLE_COMPILE"}
    if COMPILE_ENV[compile_setting]:
        env["MLX_DISABLE_COMPILE"] = COMPILE_ENV[compile_setting]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
    result: dict = json.loads(done.stdout.strip().splitlines()[-1])
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    result["tokens_per_cpu_s"] = result["tokens"] / result["cpu_s"]
    result["tokens_per_step"] = result["tokens"] / result["steps"]
    result["load_average"] = os.getloadavg()[0]
    return result


def summarise(results: dict[str, list[dict]]) -> dict:
    """Medians per side and the ratios."""
    keys = ("tokens_per_s", "tokens_per_cpu_s", "peak_gib", "max_rss_gib", "tokens_per_step")
    summary: dict = {side: {k: statistics.median(r[k] for r in runs) for k in keys} for side, runs in results.items()}
    summary["speedup"] = summary["ours"]["tokens_per_s"] / summary["theirs"]["tokens_per_s"]
    summary["speedup_cpu_time"] = summary["ours"]["tokens_per_cpu_s"] / summary["theirs"]["tokens_per_cpu_s"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m", help="a preset, built-in name or model folder")
    parser.add_argument("--conversations", type=int, help="use the first N example conversations (default: all)")
    parser.add_argument("--batch-size", type=int, default=4, help="mlx-lm's sequences per step")
    parser.add_argument("--max-seq-length", type=int, default=512, help="our packed row length; mlx-lm's cap")
    parser.add_argument("--row-length", type=int, help="our packed row length instead (e.g. mlx-lm's tokens per step)")
    parser.add_argument("--compile", default="default,off", help="MLX compile settings to run: default, off")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ.setdefault("BACKPROPAGATE_HOME", str(Path(tmp) / "home"))
            worker = worker_ours if args.worker == "ours" else worker_theirs
            print(json.dumps(worker(Path(args.model), args.data, args, Path(tmp) / "out")))
        return
    from backpropagate.model_source import resolve_model

    model = resolve_model(args.model)
    settings = [s.strip() for s in args.compile.split(",") if s.strip()]
    if not settings or any(s not in COMPILE_ENV for s in settings):
        parser.error(f"--compile takes a comma list of {', '.join(COMPILE_ENV)}")
    from importlib.metadata import version

    report: dict = {
        "model": args.model,
        "machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start",
        "versions": {name: version(name) for name in ("mlx", "mlx-lm")},
        "settings": {k: v for k, v in vars(args).items() if k not in HIDDEN},
    }
    results = {s: {"ours": [], "theirs": []} for s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in conversations(args.batch_size, args.conversations)))
        for i in range(args.rounds):
            for setting in settings:
                for side in ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours"):
                    r = run_side(side, model, data, args, setting)
                    results[setting][side].append(r)
                    print(
                        f"round {i + 1} compile={setting} {side:>6}: {r['tokens_per_s']:6.2f} tok/s "
                        f"({r['tokens_per_cpu_s']:6.2f} per CPU s)  {r['tokens']} tokens in {r['seconds']:.1f} s "
                        f"({r['steps']} steps)  peak {r['peak_gib']:.3f} GiB  rss {r['max_rss_gib']:.3f} GiB  "
                        f"load {r['load_average']:.1f}",
                        flush=True,
                    )
                    if args.json:  # written after every run, so an interrupted bench keeps what it measured
                        report[setting] = {"runs": results[setting]}
                        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    for setting in settings:
        report[setting] = {"summary": summarise(results[setting]), "runs": results[setting]}
        print(setting, json.dumps(report[setting]["summary"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
