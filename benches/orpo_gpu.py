"""ORPO speed and memory on the GPU, side by side with TRL's ORPOTrainer (shared/bench/peer_orpo.py).

The same work as the peer: random Qwen2.5-7B-shape weights (speed does not depend on
weight values), LoRA r16 on every linear layer, 4 pairs per step, ~80-word prompts and
~250-word answers drawn with the peer's generator and seed, the real Qwen2.5 tokenizer
(its chat template renders the rows, so our sequences carry the template's extra tokens).
It runs the real path: the data engine prepares the rows (pairs packed padding-free,
prompts masked), the training loop trains with the ORPO objective.

  qlora           4-bit nf4 base (the default mode on CUDA), each pair's prompt run once, activation
                  recompute planned within --memory-budget-gib (default 9.4: under half the peer's 19.1)
  qlora_on        the same with every layer recomputed (the least memory)
  lora            bf16 base, every layer recomputed (the peer's precision and recompute)
  qlora_unshared  like qlora_on, with chosen and rejected as two full sequences (diagnosis)
  NAME_eager      any of these without CUDA graphs (each step's kernels launched from Python)

Run it in the same device call as the peer, so both use the same card:

  python PEER/peer_orpo.py TOKDIR 4 18 | tee $OUT/peer_orpo.log   (16 measured steps, as ours)
  python benches/orpo_gpu.py TOKDIR --peer-log $OUT/peer_orpo.log

Each variant prints one JSON line and appends it to $OUT/results.jsonl (or /tmp); a table
then compares each with the peer's line (target: >= 2x its pairs/s at <= half its peak
memory). `--quick` runs a tiny shape for a few steps (CPU too) to check the script itself;
without TOKDIR it uses the built-in tiny-qwen2 tokenizer.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp"))
PEER_TOOL = "trl.ORPOTrainer+peft"
SPEED_TARGET, MEMORY_TARGET = 2.0, 0.5
# The peer's word list and generator (peer_orpo.py), so both train on the same rows.
WORDS = [
    "the",
    "model",
    "learns",
    "from",
    "data",
    "and",
    "gradients",
    "flow",
    "through",
    "every",
    "layer",
    "of",
    "the",
    "network",
    "while",
    "tokens",
    "pass",
]
SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab or 0 = the tokenizer's)
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064),
    "tiny": (256, 704, 2, 4, 2, 0),
}


def peer_rows(count: int, prompt_words: int, answer_words: int) -> list[dict[str, str]]:
    """Rows drawn exactly as the peer draws them."""
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    return [
        {"prompt": words(prompt_words), "chosen": words(answer_words), "rejected": words(answer_words)}
        for _ in range(count)
    ]


def model_config(shape: str, tokenizer_size: int):  # type: ignore[no-untyped-def]
    from transformers import Qwen2Config

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    return Qwen2Config(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab or -(-tokenizer_size // 64) * 64,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
    )


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare_pairs(args: argparse.Namespace, folder: Path):  # type: ignore[no-untyped-def]
    """The peer's rows through our data engine, with the given tokenizer."""
    import numpy as np

    from backpropagate.data import DataConfig, prepare

    count = args.pairs * (args.warmup + args.steps + 1)
    data = folder / "pairs.jsonl"
    rows = peer_rows(count, args.prompt_words, args.answer_words)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if not args.max_seq_length:  # the tightest row that holds the longest pair (TRL pads to the longest too)
        probe = prepare(data, args.tokenizer, DataConfig(max_seq_length=8192, cache=False))
        longest = int(np.bincount(probe.pair_id, weights=probe.sample_lengths()).max())
        args.max_seq_length = -(-longest // 64) * 64
    t0 = time.perf_counter()
    dataset = prepare(data, args.tokenizer, DataConfig(max_seq_length=args.max_seq_length, cache=False))
    prep_s = time.perf_counter() - t0
    if any(len(dataset.row_samples(r)) != 2 for r in range(dataset.num_rows)):
        raise SystemExit(f"expected one pair per {args.max_seq_length}-token row; adjust --max-seq-length")
    return dataset, prep_s


def train_config(args: argparse.Namespace, mode: str, shared: bool, recompute: str, graphs: bool):  # type: ignore[no-untyped-def]
    from backpropagate.config import TrainConfig

    return TrainConfig(
        method="orpo",
        mode=mode,
        gradient_checkpointing=recompute,
        device=args.device,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        learning_rate=8e-6,
        orpo_beta=0.1,
        shared_prompt=shared,
        cuda_graphs=graphs,
        max_seq_length=args.max_seq_length,
        micro_batch=args.pairs,
        grad_accumulation=1,
        warmup_steps=0,
        save_every=0,
        progress=False,
        report_to="none",
    ).validate()


def random_model(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(args.tokenizer))
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        return AutoModelForCausalLM.from_config(model_config(args.shape, size), dtype=dtype, attn_implementation="sdpa")


def saved_model(args: argparse.Namespace) -> Path:
    """A folder with a random model in bf16 (4-bit loading quantizes it), made once and reused."""
    folder = Path(args.model_folder)
    if not (folder / "config.json").exists():
        model = random_model(args)
        model.save_pretrained(folder, safe_serialization=True)
        del model
        release()
    return folder


@contextlib.contextmanager
def memory_budget(gib: float, device: torch.device) -> Iterator[None]:
    """Makes the auto recompute plan fill `gib` GiB in all, instead of its share of the whole card."""
    from backpropagate.train.torch import recompute

    saved = recompute.MEMORY_TARGET
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        recompute.MEMORY_TARGET = gib * 2**30 / (free + torch.cuda.memory_reserved(device))
    try:
        yield
    finally:
        recompute.MEMORY_TARGET = saved


def shared_tokens_per_pair(dataset) -> float:  # type: ignore[no-untyped-def]
    """Mean common-prefix tokens that a pair stores once (what `pair_layout` saves)."""
    import numpy as np

    from backpropagate.train.torch.preference import pair_layout, pairs_of

    batch = dataset.batch_of(np.arange(dataset.num_samples))
    chosen, rejected = pairs_of(batch, dataset)
    return float(pair_layout(batch, chosen, rejected).shared / len(chosen))


def run(variant: str, args: argparse.Namespace, dataset) -> dict:  # type: ignore[no-untyped-def,type-arg]
    from backpropagate.train.torch import loading
    from backpropagate.train.torch import loop as torch_loop

    base = variant.removesuffix("_eager")
    mode = "qlora" if base.startswith("qlora") else "lora"
    shared = not base.endswith("_unshared")
    recompute = "auto" if base == "qlora" else "on"
    graphs = base == variant
    config = train_config(args, mode, shared, recompute, graphs)
    device = torch.device(args.device)
    if mode == "qlora":
        folder = saved_model(args)
        t0 = time.perf_counter()
        tm = loading.load_for_training(folder, config)
    else:
        t0 = time.perf_counter()
        model = random_model(args)
        tm = loading.prepare_for_training(model, config, "lora", device, sum(p.numel() for p in model.parameters()))
        del model
    load_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # the peak then counts the resident weights, as the peer's does
    with tempfile.TemporaryDirectory(prefix="bp-orpo-") as tmp, memory_budget(args.memory_budget_gib, device):
        step_rows = torch_loop.rows_per_step(config, dataset.num_rows)
        total = args.warmup + args.steps
        outcome = torch_loop.train(tm, dataset, config, total, Path(tmp), f"bench-{variant}", {}, step_rows)
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    window = records[-1]["time"] - records[args.warmup - 1]["time"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    tokens = dataset.num_tokens / (dataset.num_samples / 2)
    stored = tokens - shared_tokens_per_pair(dataset) if shared else tokens
    del tm
    return {
        "variant": f"bp_orpo_{variant}",
        "tool": "backpropagate",
        "shape": args.shape,
        "card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "mode": mode,
        "shared_prompt": shared,
        "recompute": recompute,
        "cuda_graphs": graphs,
        "pairs_per_step": args.pairs,
        "max_seq_length": args.max_seq_length,
        "steps": args.steps,
        "prompt_words": args.prompt_words,
        "answer_words": args.answer_words,
        "pairs_per_s": round(args.pairs * args.steps / window, 2),
        "peak_mem_gib": round(peak, 2),
        "tokens_per_pair": round(tokens, 1),
        "stored_tokens_per_pair": round(stored, 1),
        "load_s": round(load_s, 1),
        "loss": round(outcome.state.losses[-1][1], 4),
        "features": outcome.features,
        "torch": torch.__version__,
    }


def find_peer(paths: list[Path]) -> dict | None:  # type: ignore[type-arg]
    """The peer's JSON line, from its log or the shared results file."""
    for path in paths:
        if not path.exists():
            continue
        for line in reversed(path.read_text(errors="replace").splitlines()):
            if PEER_TOOL in line and line.lstrip().startswith("{"):
                try:
                    return json.loads(line)  # type: ignore[no-any-return]
                except ValueError:
                    continue
    return None


def table(rows: list[dict], peer: dict | None) -> str:  # type: ignore[type-arg]
    head = f"{'variant':<24} {'pairs/s':>8} {'peak GiB':>9}  vs {PEER_TOOL}"
    lines = [head]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['variant']:<24} error: {row['error']}")
            continue
        note = "no peer line found"
        if peer:
            speed = row["pairs_per_s"] / peer["pairs_per_s"]
            memory = row["peak_mem_gib"] / peer["peak_mem_gib"]
            ok = speed >= SPEED_TARGET and memory <= MEMORY_TARGET
            note = (
                f"{speed:.2f}x pairs/s, {memory:.2f}x memory "
                f"(target >= {SPEED_TARGET}x at <= {MEMORY_TARGET}x: {'met' if ok else 'NOT met'})"
            )
        lines.append(f"{row['variant']:<24} {row['pairs_per_s']:>8.2f} {row['peak_mem_gib']:>9.2f}  {note}")
    if peer:
        lines.append(f"{'peer ' + PEER_TOOL:<24} {peer['pairs_per_s']:>8.2f} {peer['peak_mem_gib']:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizer", nargs="?", help="folder of the Qwen2.5 tokenizer (tokenizer.json + config)")
    parser.add_argument(
        "--variants",
        nargs="*",
        default=["qlora", "qlora_on", "lora"],
        help="qlora, qlora_on, lora, qlora_unshared; NAME_eager without CUDA graphs",
    )
    parser.add_argument("--quick", action="store_true", help="tiny shape, short rows, few steps: checks the script")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per step (the peer's 4)")
    parser.add_argument("--steps", type=int, default=16, help="measured steps")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (compilation)")
    parser.add_argument("--prompt-words", type=int, default=80)
    parser.add_argument("--answer-words", type=int, default=250)
    parser.add_argument(
        "--max-seq-length", type=int, default=0, help="packed row length, one pair per row (0: the longest pair's)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-folder", default="/tmp/bp-orpo-rand-qwen2.5-7b", help="random model folder (4-bit)")
    parser.add_argument(
        "--memory-budget-gib", type=float, default=9.4, help="qlora: what the recompute plan may fill (GiB)"
    )
    parser.add_argument("--peer-log", type=Path, help="output of peer_orpo.py (its JSON line is found there)")
    args = parser.parse_args(argv)
    args.shape = "qwen2.5-7b"
    if args.quick:
        args.shape, args.steps, args.warmup = "tiny", 2, 1
        args.prompt_words, args.answer_words = 8, 24
        args.model_folder = str(Path(tempfile.gettempdir()) / "bp-orpo-rand-tiny")
        shutil.rmtree(args.model_folder, ignore_errors=True)
    if args.tokenizer is None:
        if not args.quick:
            parser.error("give the Qwen2.5 tokenizer folder (only --quick may run without it)")
        from backpropagate.tiny import ensure_tiny_model

        args.tokenizer = str(ensure_tiny_model("tiny-qwen2"))
    from backpropagate import log

    log.configure()
    rows: list[dict] = []  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory(prefix="bp-orpo-data-") as tmp:
        dataset, prep_s = prepare_pairs(args, Path(tmp))
    for variant in args.variants:
        try:
            row = run(variant, args, dataset)
            row["data_prep_s"] = round(prep_s, 2)
        except Exception as exc:  # one failing variant must not lose the others
            row = {"variant": f"bp_orpo_{variant}", "error": f"{type(exc).__name__}: {exc}"}
            print(traceback.format_exc()[-3000:], file=sys.stderr, flush=True)
        release()
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        OUT.mkdir(parents=True, exist_ok=True)
        with open(OUT / "results.jsonl", "a") as f:
            f.write(line + "\n")
    peer = find_peer([p for p in (args.peer_log, OUT / "results.jsonl") if p is not None])
    print(table(rows, peer), flush=True)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
