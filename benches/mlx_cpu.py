"""Our MLX rail against mlx-lm's own LoRA trainer (`mlx_lm.tuner.trainer.train`, what `mlx_lm lora` runs).

Same model, same conversations (one epoch each), same LoRA (rank 8, alpha 16, every linear
layer of every block), AdamW, on this machine's CPU. Each run is its own subprocess;
rounds alternate which side goes first, and the report gives medians and the ratio.

Tokens/s counts the conversations' real tokens (no padding) over the training loop's wall
time (model loading and data preparation excluded on both sides), and over the process's
CPU time, which other work on a shared machine disturbs less (ours then includes loading
the model and saving the adapter); peak memory is MLX's peak allocation and the process's max RSS.

    .venv/bin/python benches/mlx_cpu.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHAT = REPO / "python/backpropagate/examples/chat.jsonl"
LLAMA32_TOKENIZER = REPO.parent / "shared/tokenizers/llama-3.2-3b-instruct"
# mlx's Linux CPU build multiplies with the reference BLAS (about 1.4 GFLOP/s on 2 cores, torch gets ~19),
# so the models are small. Both have the Llama 3 architecture.
SHAPES = {
    # The built-in tiny tokenizer (572 tokens): the transformer blocks dominate.
    "tiny-vocab": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, heads=4, kv_heads=2),
    # Llama 3.2's real tokenizer and 128k vocabulary: the LM head dominates, as in small real models (slow here).
    "llama3-vocab": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, heads=4, kv_heads=2),
}
LORA_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"] + [
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


def build_model(shape: str, folder: Path) -> Path:
    """A random Llama in `shape`, saved as a Hugging Face folder with its tokenizer files."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from backpropagate.tiny import ensure_tiny_model

    tokenizer_dir = LLAMA32_TOKENIZER if shape == "llama3-vocab" else ensure_tiny_model("tiny-llama")
    if shape == "llama3-vocab" and not (tokenizer_dir / "tokenizer.json").exists():
        sys.exit(f"{tokenizer_dir} is missing: run with --shape tiny-vocab")
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    size = len(vocab["model"]["vocab"]) + len(vocab.get("added_tokens", []))
    s = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=size,
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        tie_word_embeddings=False,
        rope_theta=500000.0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copyfile(tokenizer_dir / name, folder / name)
    return folder


def rows(batch_size: int, repeat: int) -> list[dict]:
    """The example chat rows in `messages` form (what mlx-lm reads), `repeat` times, cut to a multiple of the
    batch size (mlx-lm drops a short batch)."""
    examples = [json.loads(line) for line in CHAT.read_text().splitlines() if line.strip()]
    data = [r for r in examples if "messages" in r] * repeat
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

    trainer = Trainer(
        str(model),
        backend="mlx",
        mode="lora",
        lora_r=8,
        lora_alpha=16.0,
        micro_batch=1,
        grad_accumulation=1,
        learning_rate=1e-4,
        max_seq_length=args.max_seq_length,
        save_every=0,
        progress=False,
        report_to="none",
        output_dir=str(out),
    )
    from backpropagate.data import DataConfig, prepare

    prepared = prepare(data, model, DataConfig(max_seq_length=args.max_seq_length))  # mlx-lm's also precedes timing
    cpu = cpu_seconds()
    result = trainer.train(prepared, epochs=1)  # CPU time includes loading the model and saving the adapter
    cpu = cpu_seconds() - cpu
    return {"seconds": result.duration_s, "cpu_s": cpu, "tokens": result.tokens_seen, "steps": result.steps, **peaks()}


def worker_theirs(model: Path, data: Path, args: argparse.Namespace, out: Path) -> dict:
    import mlx.optimizers as optim
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    from backpropagate.train.mlx.model import mlx_config

    net, tokenizer = load(str(model), model_config=mlx_config(model))
    net.freeze()
    lora = {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": LORA_KEYS}  # scale = alpha / rank, as ours
    linear_to_lora_layers(net, len(net.layers), lora)
    conversations = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = CacheDataset(ChatDataset(conversations, tokenizer, mask_prompt=True))
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
    started, cpu = time.perf_counter(), cpu_seconds()
    train(net, optim.AdamW(learning_rate=1e-4), dataset, None, args=settings)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    return {"seconds": seconds, "cpu_s": cpu, "tokens": tokens, "steps": iters, **peaks()}


def run_side(side: str, model: Path, data: Path, args: argparse.Namespace) -> dict:
    """One training run in a fresh subprocess."""
    command = [sys.executable, __file__, "--worker", side, "--model", str(model), "--data", str(data)]
    command += ["--batch-size", str(args.batch_size), "--max-seq-length", str(args.max_seq_length)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
    result: dict = json.loads(done.stdout.strip().splitlines()[-1])
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    result["tokens_per_cpu_s"] = result["tokens"] / result["cpu_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny-vocab")
    parser.add_argument("--batch-size", type=int, default=4, help="mlx-lm's sequences per step")
    parser.add_argument("--max-seq-length", type=int, default=256, help="our packed row length; mlx-lm's cap")
    parser.add_argument("--repeat", type=int, default=4, help="times the example conversations are repeated")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ.setdefault("BACKPROPAGATE_HOME", str(Path(tmp) / "home"))
            worker = worker_ours if args.worker == "ours" else worker_theirs
            print(json.dumps(worker(args.model, args.data, args, Path(tmp) / "out")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args.shape, Path(tmp) / "model")
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows(args.batch_size, args.repeat)))
        results: dict[str, list[dict]] = {"ours": [], "theirs": []}
        for i in range(args.rounds):
            for side in ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours"):
                results[side].append(run_side(side, model, data, args))
                r = results[side][-1]
                print(
                    f"round {i + 1} {side:>6}: {r['tokens_per_s']:6.1f} tok/s ({r['tokens_per_cpu_s']:6.1f} per CPU s)  "
                    f"{r['tokens']} tokens in "
                    f"{r['seconds']:.2f} s ({r['steps']} steps)  peak {r['peak_gib']:.3f} GiB  rss {r['max_rss_gib']:.3f} GiB",
                    flush=True,
                )
    summary = {
        side: {
            key: statistics.median(r[key] for r in runs)
            for key in ("tokens_per_s", "tokens_per_cpu_s", "peak_gib", "max_rss_gib")
        }
        for side, runs in results.items()
    }
    summary["speedup"] = summary["ours"]["tokens_per_s"] / summary["theirs"]["tokens_per_s"]
    summary["speedup_cpu_time"] = summary["ours"]["tokens_per_cpu_s"] / summary["theirs"]["tokens_per_cpu_s"]
    summary["settings"] = {k: v for k, v in vars(args).items() if k not in ("worker", "model", "data", "json")}
    summary["settings"]["MLX_DISABLE_COMPILE"] = os.environ.get("MLX_DISABLE_COMPILE")
    print(json.dumps(summary, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
