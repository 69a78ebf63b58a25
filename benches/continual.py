"""Does SLAO forget less than plain sequential training? Two clearly different tasks in a row.

Task 1 answers arithmetic questions in capital letters (system: "Answer in capital
letters."); task 2 answers the same kind of questions in lowercase with a smile (system:
"Answer in lowercase and end with :)"). The tasks conflict in style, so training on task 2
pulls task 1's answers away, unless the method protects them. For each method the held-out
loss on each task is measured after the last run (the multi-run's own held-out rows):

* slao: `Trainer.multi_run(..., merge_mode="slao")` (the default),
* simple: the same runs with `merge_mode="simple"` (plain sequential training of one adapter),
* joint: one run on both tasks' training rows together (the usual upper bound).

Forgetting = task 1's held-out loss after the last run minus after run 1 (run 1 is the same
for slao and simple). Goal: slao's forgetting at most half of simple's, with its task-2 loss
within 5% of simple's. Appends one line to benches/results/continual.jsonl.

    python benches/continual.py --steps 8 --rows 60 --max-seq-length 128    # smollm2-135m on the CPU
    python benches/continual.py --model tiny-llama --steps 60 --rows 200 --learning-rate 2e-3

On a CPU shared with other jobs, set OMP_NUM_THREADS=1: torch's threads spin against the
other processes' and a step took 10x longer here without it.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "continual.jsonl"
TASKS = {
    "upper": ("Answer in capital letters.", lambda text: text.upper()),
    "smile": ("Answer in lowercase and end with :)", lambda text: text.lower() + " :)"),
}


def task_rows(style: str, count: int, seed: int) -> list[dict[str, object]]:
    """Arithmetic questions answered in one task's style."""
    system, render = TASKS[style]
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        op, value = rng.choice([("plus", a + b), ("times", a * b), ("minus", a - b)])
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"What is {a} {op} {b}?"},
                    {"role": "assistant", "content": render(f"{a} {op} {b} is {value}.")},
                ]
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=120, help="rows per task")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per task")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=256, help="packed row length; 2 rows per step")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-continual"))
    args = parser.parse_args()

    from backpropagate import Trainer
    from backpropagate.config import resolve_settings
    from backpropagate.continual.runner import heldout_losses
    from backpropagate.model_source import resolve_model

    options = {
        "lora_r": args.lora_r,
        "learning_rate": args.learning_rate,
        "max_seq_length": args.max_seq_length,
        "micro_batch": 2,
        "grad_accumulation": 1,
        "schedule": "constant",
        "warmup_steps": 0,
        "progress": False,
        "overwrite": True,
    }
    args.work.mkdir(parents=True, exist_ok=True)
    files = []
    for index, style in enumerate(TASKS):
        path = args.work / f"task-{style}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in task_rows(style, args.rows, seed=index)))
        files.append(path)

    results: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    for mode in ("slao", "simple"):
        out = args.work / mode
        result = Trainer(args.model, **options, output_dir=str(out)).multi_run(files, steps=args.steps, merge_mode=mode)
        first, last = result.runs[0]["heldout_losses"], result.runs[-1]["heldout_losses"]
        results[mode] = {
            "task1_after_run1": first["run-01"],
            "task1_final": last["run-01"],
            "task2_final": last["run-02"],
        }
    # Joint upper bound: both tasks' training rows in one run, as many steps as both runs together.
    slao_out = args.work / "slao"
    plan = json.loads((slao_out / "multi_run.json").read_text())
    joint_data = args.work / "joint.train.jsonl"
    joint_data.write_text("".join((slao_out / r["train_data"]).read_text() for r in plan["runs"]))
    trainer = Trainer(args.model, **options, output_dir=str(args.work / "joint"))
    trained = trainer.train(joint_data, steps=args.steps * len(plan["runs"]))
    settings = resolve_settings(args.model, options)
    model_path = resolve_model(settings.preset.model_id if settings.preset else args.model)
    joint = heldout_losses(
        model_path,
        settings.train,
        settings.data,
        trained.adapter_dir / "adapter_model.safetensors",
        [slao_out / r["heldout_data"] for r in plan["runs"]],
    )
    results["joint"] = {"task1_final": joint[0], "task2_final": joint[1]}

    forget = {m: results[m]["task1_final"] - results[m]["task1_after_run1"] for m in ("slao", "simple")}
    goal = {
        "forgetting_at_most_half": forget["slao"] <= 0.5 * forget["simple"],
        "task2_within_5pct": results["slao"]["task2_final"] <= 1.05 * results["simple"]["task2_final"],
    }
    line = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "device": "cpu",
        "model": args.model,
        "rows_per_task": args.rows,
        "steps_per_task": args.steps,
        "options": options,
        "heldout_loss": results,
        "forgetting_task1": forget,
        "goal": goal,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps(line, indent=2))


if __name__ == "__main__":
    main()
